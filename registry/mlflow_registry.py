"""The platform's view of the MLflow model registry.

Versions are created and aliases moved only here. Every alias move is compare-and-set
under the model's lease (``registry.audit``) and appended to the audit history in the
same step; if any part of a multi-alias move fails, the aliases already moved are put
back, so a promotion is never left half done.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.exc import SQLAlchemyError

from mlops.errors import NotFound, RegistryError, StaleAlias
from mlops.registry_model import (
    ANY,
    CHALLENGER,
    AliasMove,
    ExpectCurrent,
    VersionInfo,
    plan_promotion,
)
from mlops.settings import Settings
from registry.audit import AuditLedger, Lease, default_actor, now_iso

LOGGED_MODEL_URI = re.compile(r"models:/(m-[0-9a-f]+)")


def _not_found(exc: MlflowException) -> bool:
    return getattr(exc, "error_code", "") in {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"}


class ModelRegistry:
    """Registered models, versions and aliases in MLflow, with an audited alias ledger."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)
        self.ledger = AuditLedger(settings.audit_db_uri)
        self.lease_ttl = settings.promotion.lease_seconds
        self.lease_wait = settings.promotion.wait_seconds

    # ----------------------------------------------------------------- reads

    def exists(self, name: str) -> bool:
        """Whether ``name`` is a registered model."""
        try:
            self.client.get_registered_model(name)
            return True
        except MlflowException as exc:
            if _not_found(exc):
                return False
            raise RegistryError(f"registry error reading model '{name}': {exc.message}") from exc

    def aliases(self, name: str) -> dict[str, int]:
        """alias -> version for ``name`` (empty when the model is not registered)."""
        try:
            model = self.client.get_registered_model(name)
        except MlflowException as exc:
            if _not_found(exc):
                return {}
            raise RegistryError(f"registry error reading model '{name}': {exc.message}") from exc
        return {alias: int(v) for alias, v in (model.aliases or {}).items()}

    def aliases_by_prefix(self, prefix: str) -> dict[str, dict[str, int]]:
        """name -> (alias -> version) of every registered model whose name starts with
        ``prefix``, in one paged search (one query per 1,000 models, not one per model)."""
        if "'" in prefix or "\\" in prefix:
            raise RegistryError(f"model name prefix {prefix[:100]!r} contains a quote or backslash")
        found: dict[str, dict[str, int]] = {}
        token = None
        try:
            while True:
                page = self.client.search_registered_models(
                    filter_string=f"name LIKE '{prefix}%'", max_results=1000, page_token=token
                )
                for model in page:
                    if model.name.startswith(prefix):  # "_" and "%" in the prefix match more
                        found[model.name] = {alias: int(v) for alias, v in (model.aliases or {}).items()}
                token = page.token
                if not token:
                    return found
        except MlflowException as exc:
            raise RegistryError(f"registry error searching models '{prefix[:100]}*': {exc.message}") from exc

    def _info(self, mv, aliases: Mapping[str, int]) -> VersionInfo:
        version = int(mv.version)
        metrics: dict[str, float] = {}
        if mv.run_id:
            try:
                metrics = dict(self.client.get_run(mv.run_id).data.metrics)
            except MlflowException:
                metrics = {}
        return VersionInfo(
            name=mv.name,
            version=version,
            run_id=mv.run_id,
            aliases=tuple(sorted(a for a, v in aliases.items() if v == version)),
            tags=dict(mv.tags or {}),
            metrics=metrics,
            created_ms=int(mv.creation_timestamp or 0),
            source=mv.source or "",
        )

    def version(self, name: str, version: int) -> VersionInfo:
        """One version of ``name`` with its aliases, tags and run metrics; ``NotFound`` if there is none."""
        try:
            mv = self.client.get_model_version(name, str(version))
        except MlflowException as exc:
            if _not_found(exc):
                raise NotFound(f"model '{name}' has no version {version}") from None
            raise RegistryError(f"registry error reading '{name}' v{version}: {exc.message}") from exc
        return self._info(mv, self.aliases(name))

    def resolve(self, name: str, alias: str) -> VersionInfo:
        """The version an alias points at now (pin it: the alias may move later)."""
        version = self.aliases(name).get(alias)
        if version is None:
            known = ", ".join(sorted(self.aliases(name))) or "none"
            raise NotFound(f"model '{name}' has no alias '{alias}' (aliases: {known})")
        return self.version(name, version)

    def versions(self, name: str) -> list[VersionInfo]:
        """All versions of ``name``, newest first."""
        aliases = self.aliases(name)
        try:
            found = self.client.search_model_versions(f"name = '{name}'")
        except MlflowException as exc:
            raise RegistryError(f"registry error listing '{name}': {exc.message}") from exc
        infos = [self._info(mv, aliases) for mv in found]
        return sorted(infos, key=lambda v: v.version, reverse=True)

    def onnx_bytes(self, name: str, version: int) -> bytes:
        """The ONNX file of a version."""
        from registry.tracking import stored_onnx

        return stored_onnx(
            self.settings, self.client, self.version(name, version).source, f"'{name}' v{version}"
        )

    def run_artifact(self, run_id: str, path: str) -> bytes:
        """The bytes of artifact ``path`` of run ``run_id``; ``NotFound`` when it is not there."""
        import mlflow.artifacts

        try:
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(
                    mlflow.artifacts.download_artifacts(
                        run_id=run_id,
                        artifact_path=path,
                        dst_path=tmp,
                        tracking_uri=self.settings.tracking_uri,
                    )
                )
                if not local.is_file():
                    raise NotFound(f"run {run_id} has no artifact file {path}")
                return local.read_bytes()
        except (MlflowException, OSError) as exc:
            text = exc.message if isinstance(exc, MlflowException) else str(exc)
            raise NotFound(
                f"run {run_id} has no readable artifact {path}: {text.splitlines()[0][:200]}"
            ) from None

    def history(self, name: str | None = None, limit: int | None = None) -> list[AliasMove]:
        """Audited alias moves of ``name`` (else all models), oldest first; at most the newest ``limit``."""
        return self.ledger.history(name, limit)

    # ----------------------------------------------------------------- writes

    def register(
        self, name: str, source_uri: str, run_id: str, tags: Mapping[str, str], reason: str
    ) -> VersionInfo:
        """Create a version from a logged model and point ``challenger`` at it.

        Creation happens under the model's lease: concurrent ``create_model_version``
        calls race in MLflow, and the challenger move must not interleave with another.
        A logged model's URI (``models:/m-...``) is registered with its model id, which a
        tracking server requires to accept that source.
        """
        logged = LOGGED_MODEL_URI.fullmatch(source_uri)
        with self.ledger.lease(name, self.lease_ttl, self.lease_wait) as lease:
            try:
                if not self.exists(name):
                    self.client.create_registered_model(
                        name, description=f"Registered by the platform: {reason}"
                    )
                mv = self.client.create_model_version(
                    name,
                    source_uri,
                    run_id=run_id,
                    tags=dict(tags),
                    model_id=logged.group(1) if logged else None,
                )
            except MlflowException as exc:
                raise RegistryError(f"cannot register a version of '{name}': {exc.message}") from exc
            version = int(mv.version)
            self._apply(
                lease,
                name,
                plan_promotion(CHALLENGER, version, self.aliases(name)),
                "register",
                reason,
                run_id,
            )
        return self.version(name, version)

    def move_alias(
        self,
        name: str,
        alias: str,
        version: int,
        *,
        reason: str,
        expect_current: ExpectCurrent = ANY,
        action: str = "promote",
        run_id: str | None = None,
    ) -> list[AliasMove]:
        """Compare-and-set ``alias`` to ``version``; returns the moves made (maybe none).

        Raises ``StaleAlias`` when ``expect_current`` is given and the alias points
        elsewhere, ``NotFound`` when the version does not exist. Moving ``champion`` also
        moves ``previous-champion`` to the outgoing champion.
        """
        if not reason.strip():
            raise RegistryError("a reason is required for every alias move")
        with self.ledger.lease(name, self.lease_ttl, self.lease_wait) as lease:
            self.version(name, version)  # NotFound before anything moves
            current = self.aliases(name)
            now = current.get(alias)
            if expect_current is not ANY and now != expect_current:
                want = "unset" if expect_current is None else f"v{expect_current}"
                have = "unset" if now is None else f"v{now}"
                raise StaleAlias(f"'{name}@{alias}' is {have}, expected {want}; nothing was moved")
            return self._apply(lease, name, plan_promotion(alias, version, current), action, reason, run_id)

    def _apply(
        self,
        lease: Lease,
        name: str,
        moves: list[tuple[str, int | None, int]],
        action: str,
        reason: str,
        run_id: str | None,
    ) -> list[AliasMove]:
        self._record_external_moves(name)
        actor = default_actor()
        done: list[tuple[str, int | None, int]] = []
        try:
            for alias, old, new in moves:
                lease.confirm()
                self.client.set_registered_model_alias(name, alias, str(new))
                done.append((alias, old, new))
            at = now_iso()
            records = [
                AliasMove(name, a, old, new, actor, reason, action, run_id, at) for a, old, new in moves
            ]
            self.ledger.append(records)
        except BaseException as exc:
            self._undo(name, done)
            if isinstance(exc, MlflowException | SQLAlchemyError):
                raise RegistryError(f"alias move on '{name}' failed and was undone: {exc}") from exc
            raise
        return records

    def _undo(self, name: str, done: list[tuple[str, int | None, int]]) -> None:
        for alias, old, _new in reversed(done):
            try:
                if old is None:
                    self.client.delete_registered_model_alias(name, alias)
                else:
                    self.client.set_registered_model_alias(name, alias, str(old))
            except MlflowException as exc:  # surfaced, never swallowed
                raise RegistryError(
                    f"alias '{alias}' of '{name}' could not be restored to {old} after a failed move: {exc.message}"
                ) from exc

    def _record_external_moves(self, name: str) -> None:
        """Append history entries for alias changes made outside the platform (e.g. the UI)."""
        known = self.ledger.last_known(name)
        actual = self.aliases(name)
        drift = [
            AliasMove(
                name,
                alias,
                known.get(alias),
                actual.get(alias),
                "external",
                "alias changed outside the platform",
                "external",
            )
            for alias in sorted(set(known) | set(actual))
            if known.get(alias) != actual.get(alias)
        ]
        if drift:
            self.ledger.append(drift)
