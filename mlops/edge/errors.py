"""Errors of the edge package.

A variant that misses its budget or a stage whose telemetry fails its gate is an *outcome*
(a ``GateResult``), not an error. These are raised when an input cannot be trusted or an
operation cannot be carried out.
"""

from __future__ import annotations

from mlops.errors import PlatformError


class EdgeError(PlatformError):
    """Base of the edge package's errors."""

    exit_code = 8


class NothingToPublish(EdgeError):
    """``publish`` found no export, or the requested variant did not pass its gate."""


class KeyStoreError(EdgeError):
    """Signing keys are missing, unreadable, or a rotation cannot be made."""


class SignatureInvalid(EdgeError):
    """Signed metadata has no valid signature by a trusted key (tampered, or the wrong key)."""


class MetadataInvalid(EdgeError):
    """Signed metadata is malformed: not JSON, a missing or wrongly typed field."""


class RolloutConflict(EdgeError):
    """A rollout cannot start: no published bundle, or another rollout of it is in progress."""
