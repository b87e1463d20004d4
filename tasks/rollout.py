"""Tasks of the rollout flow: every IO a rollout does, each behind one small function.

Status store (``$MLOPS_HOME/rollouts/<id>/``): ``status.json`` (written atomically after
every decision and every applied effect), ``plan.json`` (the plan the rollout runs, so a
resume runs the same one), ``references.json`` (each variant's reference, built once at
the start) and ``report.html``.

Effects: a route effect is sent as is to the serving admin API (``PUT /admin/state``) with
its key as the Idempotency-Key; an alias effect is a list of compare-and-set moves through
the audited registry (``ModelRegistry.move_alias(expect_current=...)``), where a repeat
after a crash finds the alias already at its target. Both are safe to retry, so retries
sit on these tasks and nowhere else.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from adapters.files import atomic_write
from mlops.errors import PlatformError, StaleAlias
from mlops.gates import GateResult
from mlops.onnx_model import OnnxScorer
from mlops.predlog import FEATURE_PREFIX, PRIMARY
from mlops.registry_model import CHALLENGER, CHAMPION
from mlops.rollout.machine import Effect, RolloutStatus, dump_status, load_status
from mlops.rollout.observe import CANDIDATE, STABLE, Observations, Reference, observe, observe_replay
from mlops.rollout.plan import ABStep, BanditStep, ReplayStep, RolloutPlan
from mlops.settings import Settings
from registry.mlflow_registry import ModelRegistry
from registry.promotion import champion_gate
from serving.client import ServingAdmin
from serving.predlog_store import PredictionLogStore

ROLLOUTS = "rollouts"
REPLAY_ROWS = 5000  # most recent stable answers replayed offline through both models
REPLAY_LOOKBACK = timedelta(hours=6)


class RolloutNotFound(PlatformError):
    """No persisted rollout with that id (or no rollout at all) under this MLOPS_HOME."""

    exit_code = 4


# --------------------------------------------------------------------------- status store


def rollouts_dir(settings: Settings) -> Path:
    """The folder holding every rollout's files."""
    return settings.home_path / ROLLOUTS


def rollout_dir(settings: Settings, rollout_id: str) -> Path:
    """The folder of one rollout's files."""
    return rollouts_dir(settings) / rollout_id


def _atomic_write(path: Path, text: str) -> None:
    atomic_write(path, text.encode(), mode=0o644)


def save_status(settings: Settings, status: RolloutStatus) -> None:
    """Persist ``status`` (temporary file, fsync, rename: a crash leaves the old or the new)."""
    _atomic_write(rollout_dir(settings, status.rollout_id) / "status.json", dump_status(status))


def read_status(settings: Settings, rollout_id: str) -> RolloutStatus:
    """The persisted status of a rollout."""
    path = rollout_dir(settings, rollout_id) / "status.json"
    try:
        return load_status(path.read_text())
    except FileNotFoundError:
        raise RolloutNotFound(f"no rollout {rollout_id!r} under {rollouts_dir(settings)}") from None


def save_plan(settings: Settings, rollout_id: str, plan: RolloutPlan) -> None:
    """Keep the plan a rollout runs, so a resume runs the same one."""
    _atomic_write(rollout_dir(settings, rollout_id) / "plan.json", plan.model_dump_json(indent=1))


def read_plan(settings: Settings, rollout_id: str) -> RolloutPlan:
    """The plan a rollout was started with."""
    path = rollout_dir(settings, rollout_id) / "plan.json"
    try:
        return RolloutPlan.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise RolloutNotFound(
            f"rollout {rollout_id!r} has no plan.json under {rollouts_dir(settings)}"
        ) from None


def list_rollouts(settings: Settings) -> list[RolloutStatus]:
    """Every persisted rollout, oldest first."""
    out = []
    for path in sorted(rollouts_dir(settings).glob("*/status.json")):
        out.append(load_status(path.read_text()))
    return sorted(out, key=lambda s: s.created_at)


def save_references(settings: Settings, rollout_id: str, refs: dict[str, Reference]) -> None:
    """Keep each variant's reference, built once at the start."""
    _atomic_write(
        rollout_dir(settings, rollout_id) / "references.json",
        json.dumps({k: r.to_dict() for k, r in refs.items()}),
    )


def read_references(settings: Settings, rollout_id: str) -> dict[str, Reference]:
    """The variants' references saved at the start."""
    path = rollout_dir(settings, rollout_id) / "references.json"
    if not path.exists():
        return {}
    return {k: Reference.from_dict(v) for k, v in json.loads(path.read_text()).items()}


# --------------------------------------------------------------------------- registry


@task(name="resolve-rollout-versions", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[1, 3, 10])
def resolve_versions(
    settings: Settings, candidate_alias: str = CHALLENGER
) -> tuple[str, int, int, dict[str, int]]:
    """``(model_name, champion version, candidate version, aliases)`` as the registry has them now."""
    registry = ModelRegistry(settings)
    name = settings.serving.model_name or settings.training.model_name
    aliases = registry.aliases(name)
    if CHAMPION not in aliases:
        raise StaleAlias(f"'{name}' has no champion: nothing to roll out against")
    candidate = aliases.get(candidate_alias)
    if candidate is None:
        if candidate_alias.isdigit():
            candidate = registry.version(name, int(candidate_alias)).version
        else:
            raise StaleAlias(f"'{name}' has no alias '{candidate_alias}'")
    return name, aliases[CHAMPION], candidate, aliases


@task(name="offline-promotion-gate", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[1, 3, 10])
def offline_gate(settings: Settings, model_name: str, version: int) -> GateResult:
    """The registry's promotion gate for ``version``: its offline metrics against the champion's."""
    return champion_gate(settings, ModelRegistry(settings), model_name, version)


@task(name="read-challenger", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[1, 3, 10])
def challenger_version(settings: Settings, model_name: str) -> int | None:
    """Where the registry's ``challenger`` alias points now."""
    return ModelRegistry(settings).aliases(model_name).get(CHALLENGER)


# --------------------------------------------------------------------------- effects


@task(name="apply-effect", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[1, 3, 10])
def apply_effect(settings: Settings, admin: ServingAdmin, status: RolloutStatus, effect: Effect) -> None:
    """Apply one effect (idempotent: see the module docstring)."""
    if effect.route is not None:
        admin.apply(effect.route.model_dump(), key=effect.key)
    if effect.aliases:
        registry = ModelRegistry(settings)
        for change in effect.aliases:
            if change.implied or change.to_version is None:
                continue  # moved by the registry itself with the champion
            if registry.aliases(status.model_name).get(change.alias) == change.to_version:
                continue  # a repeat after a crash: already done
            registry.move_alias(
                status.model_name,
                change.alias,
                change.to_version,
                expect_current=change.from_version,
                reason=f"rollout {status.rollout_id}: {effect.description}",
                action="rollout",
            )


# --------------------------------------------------------------------------- observations


def _features(frame: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    return pd.DataFrame({n: frame[FEATURE_PREFIX + n] for n in settings.dataset.feature_names})


def _recent_stable(settings: Settings, status: RolloutStatus, until: datetime) -> pd.DataFrame:
    store = PredictionLogStore.for_settings(settings)
    since = until - REPLAY_LOOKBACK
    log = store.read_log(since=since, until=until, model_name=status.model_name)
    routed = ~log["forced"].to_numpy(dtype=bool, na_value=False)  # a caller's choice is no evidence
    log = log[
        routed
        & (log["role"] == PRIMARY)
        & (log["status"] == 200)
        & (log["model_version"] == status.stable_version)
    ]
    return log.tail(REPLAY_ROWS)


class _Scorers:
    """ONNX scorers of the two versions under comparison (loaded once per process)."""

    cache: dict[tuple[str, str, int], OnnxScorer] = {}

    @classmethod
    def get(cls, settings: Settings, name: str, version: int) -> OnnxScorer:
        key = (settings.tracking_uri, name, version)
        if key not in cls.cache:
            cls.cache[key] = OnnxScorer(ModelRegistry(settings).onnx_bytes(name, version), settings.dataset)
        return cls.cache[key]


@task(name="build-references", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def build_references(settings: Settings, status: RolloutStatus) -> dict[str, Reference]:
    """Each variant's reference: its model's scores on, and the inputs of, recent stable
    traffic from before the rollout (empty when there is none yet: drift is then NaN)."""
    rows = _recent_stable(settings, status, status.created_at)
    if len(rows) < 100:
        return {}
    feats = _features(rows, settings)
    schema = settings.dataset
    refs = {}
    for slot, v in ((STABLE, status.stable_version), (CANDIDATE, status.candidate_version)):
        scores = _Scorers.get(settings, status.model_name, v).predict_proba(feats)
        scores = scores[np.isfinite(scores)]  # a failing answer has no score to compare with
        refs[slot] = Reference.build(scores, feats, schema.numeric_names, schema.categorical_names)
    return refs


@task(name="observe", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 3])
def observe_tick(
    settings: Settings, status: RolloutStatus, plan: RolloutPlan, refs: dict[str, Reference], now: datetime
) -> Observations | None:
    """This tick's observations of the current step (``None``: nothing to read yet)."""
    step = plan.steps[status.step_index]
    if isinstance(step, ReplayStep):
        rows = _recent_stable(settings, status, now)
        if rows.empty:
            return observe_replay(
                np.empty(0),
                np.empty(0),
                stable_version=status.stable_version,
                candidate_version=status.candidate_version,
            )
        feats = _features(rows, settings)
        s = _Scorers.get(settings, status.model_name, status.stable_version).predict_proba(feats)
        c = _Scorers.get(settings, status.model_name, status.candidate_version).predict_proba(feats)
        thr = settings.serving.decision_threshold or settings.training.decision_threshold
        return observe_replay(
            s,
            c,
            stable_version=status.stable_version,
            candidate_version=status.candidate_version,
            thresholds=(thr, thr),
            frame=feats,
            references=refs,
        )
    since = status.window_start
    if since is None:
        return None
    store = PredictionLogStore.for_settings(settings)
    log = store.read_log(since=since, until=now, model_name=status.model_name)
    labels = store.read_feedback(since=since)
    return observe(
        log,
        labels,
        stable_version=status.stable_version,
        candidate_version=status.candidate_version,
        since=since,
        until=now,
        references=refs if step.needs_reference else None,
        ab_metric=step.primary.metric if isinstance(step, ABStep) else None,
        reward=step.reward_metric if isinstance(step, BanditStep) else None,
    )


def utcnow() -> datetime:
    """The current time in UTC (the flow's clock)."""
    return datetime.now(UTC)


# --------------------------------------------------------------------------- report


def write_report(settings: Settings, status: RolloutStatus, plan: RolloutPlan) -> Path:
    """Render ``report.html`` next to the status; its path."""
    from mlops.rollout.report import render_report

    path = rollout_dir(settings, status.rollout_id) / "report.html"
    _atomic_write(path, render_report(status, plan))
    return path


@task(name="attach-report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def attach_report(settings: Settings, status: RolloutStatus, path: Path) -> str | None:
    """Log the report to the candidate version's MLflow run (``rollouts/<id>/``); the run id."""
    from mlflow.tracking import MlflowClient

    run_id = ModelRegistry(settings).version(status.model_name, status.candidate_version).run_id
    if not run_id:
        return None
    MlflowClient(tracking_uri=settings.tracking_uri).log_artifact(
        run_id, str(path), f"rollouts/{status.rollout_id}"
    )
    return run_id
