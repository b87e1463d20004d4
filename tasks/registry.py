"""Tasks that talk to MLflow: log a training run, register a version, promote."""

from __future__ import annotations

from collections.abc import Mapping

from prefect import task

from mlops.errors import GateFailed, StaleAlias
from mlops.gates import GateResult
from mlops.registry_model import CHAMPION, VersionInfo
from mlops.settings import Settings
from registry import tracking
from registry.mlflow_registry import ModelRegistry
from registry.promotion import champion_gate, promote

log_training_run = task(name="log-training-run", retries=2, retry_delay_seconds=[2, 10])(
    tracking.log_training_run
)
log_evaluation_record = task(name="sign-evaluation-record", retries=2, retry_delay_seconds=[2, 10])(
    tracking.log_evaluation_record
)


# Not retried: a retry after a lost response would register a second version.
@task(name="register-version")
def register_version(
    settings: Settings, source_uri: str, run_id: str, tags: Mapping[str, str], reason: str
) -> VersionInfo:
    """Register a logged model as a new version of the configured model and make it challenger."""
    return ModelRegistry(settings).register(settings.training.model_name, source_uri, run_id, tags, reason)


@task(name="promotion-gate")
def first_champion_or_gate(settings: Settings, version: int, run_id: str | None) -> tuple[bool, GateResult]:
    """Make a first version champion when allowed; otherwise only report the gate's verdict."""
    registry = ModelRegistry(settings)
    name = settings.training.model_name
    if CHAMPION not in registry.aliases(name) and settings.promotion.promote_first_version:
        try:
            result = promote(
                settings,
                registry,
                name=name,
                alias=CHAMPION,
                version=version,
                reason="first version that passes the promotion gate",
                expect_current=None,
                run_id=run_id,
            )
        except (GateFailed, StaleAlias):  # failed the gate, or another run got there first
            return False, champion_gate(settings, registry, name, version)
        return True, result.gate or champion_gate(settings, registry, name, version)
    return False, champion_gate(settings, registry, name, version)
