"""Tasks of the edge flows: every call that reads or writes the registry, files, keys or telemetry."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from adapters.edge_fleet import Fleet, RepositoryServer
from adapters.edge_store import ReleaseRepository, TelemetryStore, VariantStore, edge_paths, key_store
from mlops.edge import graph, release
from mlops.edge.budget import EdgeBudget
from mlops.edge.errors import NothingToPublish, RolloutConflict
from mlops.edge.manifest import ModelManifest, open_envelope, parse_manifest
from mlops.errors import DataError
from mlops.registry_model import VersionInfo
from mlops.settings import Settings
from registry.edge_tracking import log_edge_run
from registry.mlflow_registry import ModelRegistry

paths = edge_paths


# --------------------------------------------------------------------------- export


@task(name="fetch-champion", retries=2, retry_delay_seconds=[2, 10])
def fetch_model(settings: Settings, name: str, alias: str) -> tuple[VersionInfo, bytes]:
    """The version an alias points at now (pinned for the whole export) and its ONNX bytes."""
    registry = ModelRegistry(settings)
    info = registry.resolve(name, alias)
    return info, registry.onnx_bytes(name, info.version)


@task(name="load-teacher-data", retries=2, retry_delay_seconds=[1, 5])
def load_teacher_data(settings: Settings, info: VersionInfo, budget: EdgeBudget) -> tuple[pd.DataFrame, str]:
    """The rows the teacher was trained on (its lineage path), or fresh synthetic rows if they are gone."""
    from adapters.datasets import read_frame
    from mlops.datagen import fraud_schema, generate

    path = info.tags.get("lineage.data_path")
    if path and Path(path).exists():
        return read_frame(path), path
    if settings.dataset.name != fraud_schema().name:
        raise DataError(
            f"'{info.name}' v{info.version}: its training data {path or '(no lineage.data_path)'} is gone"
        )
    rows = budget.fallback_rows
    return generate(
        rows, seed=budget.seed
    ), f"generated ({rows:,} rows, seed {budget.seed}; {path or 'no lineage path'} not found)"


@task(name="write-edge-export")
def write_export(
    settings: Settings,
    model: str,
    version: int,
    budget: str,
    files: Mapping[str, bytes],
    report: Mapping[str, Any],
) -> str:
    """Write an export's files and report under the variant store; its folder."""
    return str(VariantStore(paths(settings).variants).write_export(model, version, budget, files, report))


@task(name="log-edge-export", retries=2, retry_delay_seconds=[2, 10])
def log_export(settings: Settings, **kwargs: Any) -> str:
    """Log an export as an MLflow run; its run id."""
    return log_edge_run(settings, **kwargs)


def frame_bytes(frame: pd.DataFrame) -> bytes:
    """A data frame as Parquet bytes."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- publish


@task(name="publish-release")
def publish(
    settings: Settings,
    *,
    model_name: str,
    variant: str,
    model: bytes,
    rows: pd.DataFrame,
    device_classes: Sequence[str],
    min_runtime_version: str,
    source_version: int | None,
    restores: int | None = None,
) -> ModelManifest:
    """Sign a new release (next version, cohort 0%) and add it to the repository."""
    keys = key_store(settings)
    keys.init()
    repo = ReleaseRepository(paths(settings).repo)
    version = repo.latest_version(model_name) + 1
    good = repo.state(model_name).get("last_good")
    baseline = (int(good), load_release(settings, model_name, int(good)).reference) if good else None
    signed = release.release_document(
        model_name=model_name,
        version=version,
        variant=variant,
        model=model,
        source_version=source_version,
        device_classes=tuple(device_classes),
        min_runtime_version=min_runtime_version,
        rows=rows,
        schema=settings.dataset,
        edge=settings.edge,
        now=datetime.now(UTC),
        restores=restores,
        baseline=baseline,
    )
    repo.add(model_name, version, model, keys.sign(signed))
    serve_signed(settings, model_name, signed)
    out = repo.folder / model_name / "releases" / str(version)
    (out / "sample.parquet").write_bytes(frame_bytes(rows))
    return parse_manifest(signed)


def release_sample(settings: Settings, model_name: str, version: int) -> pd.DataFrame:
    """The sample rows stored with a release (its reference traffic)."""
    path = paths(settings).repo / model_name / "releases" / str(version) / "sample.parquet"
    if not path.exists():
        raise NothingToPublish(f"release v{version} of '{model_name}' has no sample rows ({path})")
    return pd.read_parquet(path)


def load_release(settings: Settings, model_name: str, version: int) -> ModelManifest:
    """The manifest of a release in the repository."""
    return ReleaseRepository(paths(settings).repo).release(model_name, version)


@task(name="publish-drill")
def publish_drill(settings: Settings, model_name: str, drill: str) -> ModelManifest:
    """A deliberately bad release made from the last good one, to exercise the rollout's defences.

    ``broken-model`` answers NaN (fails every device's health check); ``shifted-model``
    answers square-rooted probabilities (passes the health check, shifts predictions).
    """
    repo = ReleaseRepository(paths(settings).repo)
    base = int(repo.state(model_name).get("last_good") or repo.latest_version(model_name))
    if base == 0:
        raise RolloutConflict(f"'{model_name}' has no release to make a drill from (publish one first)")
    how = {"broken-model": "nan", "shifted-model": "sqrt"}[drill]
    bad = graph.with_output_transform(repo.model_bytes(model_name, base), how)
    base_release = load_release(settings, model_name, base)
    return publish.fn(
        settings,
        model_name=model_name,
        variant=f"{base_release.variant}+drill-{drill}",
        model=bad,
        rows=release_sample(settings, model_name, base),
        device_classes=base_release.device_classes,
        min_runtime_version=base_release.min_runtime_version,
        source_version=base_release.source_version,
    )


# --------------------------------------------------------------------------- rollout


@task(name="serve-cohort", retries=2, retry_delay_seconds=[1, 3])
def serve_cohort(settings: Settings, model_name: str, version: int, percent: float) -> None:
    """Re-sign the release for a cohort of ``percent`` and serve it to devices."""
    repo = ReleaseRepository(paths(settings).repo)
    signed, _ = open_envelope(repo.release_metadata(model_name, version))
    doc = release.with_cohort(signed, percent, datetime.now(UTC), settings.edge.manifest_ttl_hours)
    serve_signed(settings, model_name, doc)


def serve_signed(settings: Settings, model_name: str, signed: Mapping[str, Any]) -> bytes:
    """Sign a release with the release key and serve it with a fresh timestamp naming it; the served bytes."""
    metadata = key_store(settings).sign(signed)
    _serve_with_timestamp(settings, model_name, metadata, int(signed["version"]))
    return metadata


def _serve_with_timestamp(settings: Settings, model_name: str, metadata: bytes, release_version: int) -> None:
    repo = ReleaseRepository(paths(settings).repo)
    ts = release.timestamp_document(
        model_name=model_name,
        version=repo.timestamp_version(model_name) + 1,
        release_version=release_version,
        release_metadata=metadata,
        now=datetime.now(UTC),
        ttl_hours=settings.edge.timestamp_ttl_hours,
    )
    repo.serve(model_name, metadata, key_store(settings).sign(ts))


def refresh_timestamps(settings: Settings, *, resign: bool = False) -> list[tuple[str, int]]:
    """Re-sign the timestamp of every served release (run more often than ``edge.timestamp_ttl_hours``).

    With ``resign`` the served releases are re-signed too, unchanged, by the current
    release key (after a rotation, so devices that trust only the new key accept them).
    Returns ``(model, served release version)`` for each model.
    """
    repo = ReleaseRepository(paths(settings).repo)
    done = []
    for model_name in repo.models():
        served = repo.served(model_name)
        if served is None:
            continue
        signed, _ = open_envelope(served)
        version = int(signed["version"])
        if resign:
            serve_signed(settings, model_name, signed)
        else:
            _serve_with_timestamp(settings, model_name, served, version)
        done.append((model_name, version))
    return done


def rotate_keys(settings: Settings, *, root: bool = False) -> tuple[Any, Any, list[tuple[str, int]]]:
    """Rotate the release key (and the root key with ``root``), then re-sign what is served with the new key.

    Devices fetch the new root before the release metadata, so from the moment this returns
    they accept what is served; nothing waits for the next publish.
    """
    old, new = key_store(settings).rotate(root=root)
    return old, new, refresh_timestamps(settings, resign=True)


@task(name="run-stage", cache_policy=NO_CACHE)
def run_stage(
    settings: Settings,
    fleet: Fleet,
    fleet_name: str,
    rollout_id: str,
    model_name: str,
    version: int,
    percent: float,
    device_ids: Sequence[str],
) -> list[dict[str, Any]]:
    """Serve the release to a ``percent`` cohort, let every device poll, store telemetry; the rollout's events so far."""
    serve_cohort.fn(settings, model_name, version, percent)
    poll_devices.fn(settings, fleet, fleet_name, rollout_id, device_ids)
    return rollout_events.fn(settings, rollout_id)


def fleet_for(settings: Settings, name: str, traffic: pd.DataFrame) -> Fleet:
    """The simulated fleet ``name``, replaying ``traffic`` rows."""
    return Fleet(
        paths(settings).fleets / name,
        settings.dataset,
        traffic,
        settings.edge.traffic_rows,
        settings.edge.fleet_fsync,
    )


@task(name="provision-fleet", cache_policy=NO_CACHE)
def provision_fleet(
    settings: Settings, fleet: Fleet, count: int, model_name: str, device_class: str
) -> list[str]:
    """Grow the fleet to ``count`` devices; new ones carry the last good release and the current root."""
    import onnxruntime

    repo = ReleaseRepository(paths(settings).repo)
    keys = key_store(settings)
    good = repo.state(model_name).get("last_good")
    factory = repo.model_bytes(model_name, int(good)) if good else None
    root = keys.root_bytes(keys.root_versions()[-1])
    return fleet.provision(
        count, model_name, device_class, onnxruntime.__version__, root, factory, int(good or 0)
    )


@task(name="poll-devices", cache_policy=NO_CACHE)
def poll_devices(
    settings: Settings,
    fleet: Fleet,
    fleet_name: str,
    rollout_id: str,
    device_ids: Sequence[str] | None = None,
) -> int:
    """One update cycle on the devices; their telemetry appended to the telemetry store."""
    server = RepositoryServer(ReleaseRepository(paths(settings).repo), key_store(settings))
    events = fleet.poll(server, datetime.now(UTC), device_ids)
    TelemetryStore(paths(settings).telemetry).append(
        [e | {"fleet": fleet_name, "rollout_id": rollout_id} for e in events]
    )
    fleet.ack(events)
    rejected = [e for e in events if e["event"] in ("rejected", "health_failed")]
    if rejected:
        get_run_logger().warning(
            "%d device(s) refused or failed the release, e.g. %s: %s",
            len(rejected),
            rejected[0]["device_id"],
            rejected[0]["reason"],
        )
    return len(events)


@task(name="mark-good-release", retries=2, retry_delay_seconds=[1, 3])
def mark_good(settings: Settings, model_name: str, version: int) -> None:
    """Record ``version`` as the release devices are restored to on a rollback."""
    ReleaseRepository(paths(settings).repo).set_state(model_name, last_good=version)


@task(name="restore-release", cache_policy=NO_CACHE)
def restore_release(
    settings: Settings,
    fleet: Fleet,
    fleet_name: str,
    rollout_id: str,
    release: ModelManifest,
    good: int,
    device_ids: Sequence[str],
) -> int:
    """Publish a release carrying release ``good``'s model (newer than ``release``, so devices
    take it), serve it to every device and record it as good; its version."""
    repo = ReleaseRepository(paths(settings).repo)
    name = release.model
    restored = publish.fn(
        settings,
        model_name=name,
        variant=load_release(settings, name, good).variant,
        model=repo.model_bytes(name, good),
        rows=release_sample(settings, name, good),
        device_classes=release.device_classes,
        min_runtime_version=release.min_runtime_version,
        source_version=release.source_version,
        restores=good,
    )
    run_stage.fn(settings, fleet, fleet_name, rollout_id, name, restored.version, 100.0, device_ids)
    repo.set_state(name, last_good=restored.version)
    get_run_logger().warning(
        "rolled back: release v%d restores v%d's model on every device", restored.version, good
    )
    return restored.version


@task(name="read-telemetry", retries=2, retry_delay_seconds=[1, 3])
def rollout_events(settings: Settings, rollout_id: str) -> list[dict[str, Any]]:
    """Every device event recorded for a rollout so far."""
    return TelemetryStore(paths(settings).telemetry).events(rollout_id=rollout_id)


@task(name="save-rollout-status", retries=2, retry_delay_seconds=[1, 3])
def save_status(settings: Settings, fleet_name: str, status: dict[str, Any]) -> None:
    """Persist an OTA rollout's status (JSON file and telemetry database)."""
    from adapters.edge_store import write_json

    write_json(paths(settings).rollouts / f"{status['rollout_id']}.json", status)
    TelemetryStore(paths(settings).telemetry).save_rollout(fleet_name, status)
