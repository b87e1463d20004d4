"""The platform's exception hierarchy.

Adapters translate third-party exceptions into these once, at their boundary; the CLI
turns any ``PlatformError`` into one readable line and a non-zero exit code.
"""

from __future__ import annotations


class PlatformError(Exception):
    """Base class of every error the platform raises on purpose (bad input, failed gate)."""

    exit_code = 1


class ConfigError(PlatformError):
    """A configuration file or override is missing, malformed or names an unknown field."""

    exit_code = 2


class DataError(PlatformError):
    """An input dataset cannot be read or does not have the declared columns."""

    exit_code = 3


class ValidationFailed(DataError):
    """A data batch failed its expectation suite; ``failures`` lists each failed expectation."""

    def __init__(self, message: str, failures: list[str]):
        super().__init__(message)
        self.failures = list(failures)

    def __str__(self) -> str:
        head = super().__str__()
        if not self.failures:
            return head
        return head + "\n" + "\n".join(f"  - {f}" for f in self.failures)


class EvidenceUntrusted(DataError):
    """A version's evaluation record is missing, not signed by a trusted training key, or does
    not match the version (its run, its model, its holdout or training-row files)."""


class ModelError(PlatformError):
    """Training, conversion or evaluation of a model failed."""

    exit_code = 4


class ParityFailed(ModelError):
    """ONNX predictions disagree with the source model beyond the configured tolerance."""


class RegistryError(PlatformError):
    """The model registry refused an operation or has no such model, version or alias."""

    exit_code = 5


class NotFound(RegistryError):
    """A model, version or alias does not exist in the registry."""


class StaleAlias(RegistryError):
    """A compare-and-set alias move found the alias somewhere other than expected."""


class RegistryBusy(RegistryError):
    """Another promotion of the same model holds the lease for longer than we may wait."""


class GateFailed(PlatformError):
    """A promotion or rollout gate did not pass; the message carries each reason."""

    exit_code = 6
