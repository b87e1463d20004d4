"""Where the service gets model versions: the registry behind a small interface.

``ModelSource`` is all the service needs (resolve an alias, fetch a version's ONNX bytes);
``RegistrySource`` is the real one over ``registry.mlflow_registry.ModelRegistry``, with the
registry's errors translated once, here, into the service's own.
"""

from __future__ import annotations

import threading
from typing import Protocol

from mlops.errors import NotFound, RegistryError
from mlops.settings import Settings
from serving.errors import ServingError, UnknownModel


class ModelSource(Protocol):
    """Where the service gets model versions: resolve aliases and read ONNX bytes."""

    def resolve(self, alias: str) -> int | None:
        """The version ``alias`` points at now, or None when the alias is unset."""
        ...

    def onnx(self, version: int) -> bytes:
        """The ONNX model of ``version``; ``UnknownModel`` when there is no such version."""
        ...

    def exists(self, version: int) -> bool:
        """Whether ``version`` is registered."""
        ...

    def tags(self, version: int) -> dict[str, str]:
        """The tags of ``version`` (its lineage: e.g. the feature view it was trained on)."""
        ...


class RegistrySource:
    """Versions of one registered model, read from the platform's MLflow registry."""

    def __init__(self, settings: Settings, model_name: str):
        from registry.mlflow_registry import ModelRegistry

        self.model_name = model_name
        self.registry = ModelRegistry(settings)
        self._lock = threading.Lock()  # loads run in threads; MLflow clients are not shared concurrently

    def resolve(self, alias: str) -> int | None:
        """The version ``alias`` points at now, or None when the alias is unset."""
        with self._lock:
            try:
                return self.registry.aliases(self.model_name).get(alias)
            except RegistryError as exc:
                raise ServingError(f"registry unavailable: {exc}", 503) from exc

    def onnx(self, version: int) -> bytes:
        """The ONNX model of ``version``; ``UnknownModel`` when there is no such version."""
        with self._lock:
            try:
                return self.registry.onnx_bytes(self.model_name, version)
            except NotFound:
                raise UnknownModel(f"model '{self.model_name}' has no version {version}") from None
            except RegistryError as exc:
                raise ServingError(f"registry unavailable: {exc}", 503) from exc

    def exists(self, version: int) -> bool:
        """Whether ``version`` is registered."""
        with self._lock:
            try:
                self.registry.version(self.model_name, version)
                return True
            except NotFound:
                return False
            except RegistryError as exc:
                raise ServingError(f"registry unavailable: {exc}", 503) from exc

    def tags(self, version: int) -> dict[str, str]:
        """The tags of ``version`` (its lineage: e.g. the feature view it was trained on)."""
        with self._lock:
            try:
                return dict(self.registry.version(self.model_name, version).tags)
            except NotFound:
                raise UnknownModel(f"model '{self.model_name}' has no version {version}") from None
            except RegistryError as exc:
                raise ServingError(f"registry unavailable: {exc}", 503) from exc


class RegistryAliases:
    """One alias of every registered model whose name starts with a prefix, read from the
    platform's MLflow registry in one search (tenants' models: one query for all of them)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._registry = None  # created on first use, in the calling (worker) thread
        self._lock = threading.Lock()

    def resolve_all(self, prefix: str, alias: str) -> dict[str, int]:
        """name -> the version ``alias`` points at, for every model named ``prefix...`` that
        has that alias set; ``ServingError`` (503) when the registry cannot be read."""
        with self._lock:
            try:
                if self._registry is None:
                    from registry.mlflow_registry import ModelRegistry

                    self._registry = ModelRegistry(self.settings)
                found = self._registry.aliases_by_prefix(prefix)
            except RegistryError as exc:
                raise ServingError(f"registry unavailable: {exc}", 503) from exc
        return {name: aliases[alias] for name, aliases in found.items() if alias in aliases}
