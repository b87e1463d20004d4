"""Edge flows: export (compress + gate + report), publish (sign a release), OTA rollout (staged, gated),
and the fleet side of a server rollout's devices step (``apply_device_effect``, ``device_gate``).

The flows sequence calls and pass data; every decision is a plain function in
``mlops.edge`` (variant gate and selection, release metadata, cohorts, the telemetry gate,
the rollout state machine) and every side effect a task in ``tasks.edge``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from adapters.runtime import configure
from flows.params import AliasParam, BudgetParam
from mlops import modeling
from mlops.edge import report
from mlops.edge.budget import load_budget
from mlops.edge.cohorts import cohort
from mlops.edge.compress import VariantBuilder, prepare_data
from mlops.edge.errors import NothingToPublish, RolloutConflict
from mlops.edge.manifest import ModelManifest
from mlops.edge.ota import OtaEffect, decide, start
from mlops.edge.telemetry import assess_stage, observe
from mlops.edge.variants import VariantResult, select_variant
from mlops.gates import GateResult
from mlops.registry_model import CHAMPION
from mlops.rollout.machine import Effect, record_release
from mlops.rollout.machine import RolloutStatus as ServerStatus
from mlops.rollout.plan import DeviceStep
from mlops.rollout.vocabulary import Action, Phase
from mlops.settings import Settings, load_settings
from tasks import edge as t
from tasks.edge import Fleet

# --------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportSummary:
    """What an export run built: every variant's numbers, the selected one and where they were written."""

    model_name: str
    source_version: int
    alias: str
    budget: str
    selected: str | None
    variants: list[dict[str, Any]]
    teacher_bytes: int
    export_dir: str
    run_id: str
    data_source: str
    report_markdown: str


def _line(r: VariantResult) -> str:
    m = r.measurement
    if m is None:
        return f"{r.name}: {r.outcome}: {r.verdict}"
    return (
        f"{r.name}: {r.outcome}: {m.size_bytes:,} B, p50 {m.latency_p50_ms:.3f} ms, p99 {m.latency_p99_ms:.3f} ms, "
        f"{m.metric} {m.value:.4f} (drop {m.drop:+.4f}), max |dp| {m.max_abs_dp:.4f}; {r.verdict}"
    )


@flow(name="edge-export", log_prints=True)
def edge_export_flow(
    alias: AliasParam = CHAMPION,
    budget: BudgetParam | None = None,
    config: str | None = None,
    model: str | None = None,
) -> ExportSummary:
    """Build every variant of the budget from the ``alias`` model, gate them, report, keep the passing ones.

    Args:
        alias: Registry alias of the model to compress (champion, challenger, ...).
        budget: Device budget YAML, e.g. configs/edge/pos-terminal.yaml (default: from config).
        config: Platform config YAML (default: $MLOPS_CONFIG, else built-in defaults).
        model: Registered model name (default: from config).
    """
    settings = load_settings(config)
    configure(settings)
    logger = get_run_logger()
    plan = load_budget(budget or settings.edge.budget)
    name = model or settings.training.model_name
    schema = settings.dataset

    info, teacher = t.fetch_model(settings, name, alias)
    frame, source = t.load_teacher_data(settings, info, plan)
    logger.info("teacher %s v%d (%s, %s B); data: %s", name, info.version, alias, f"{len(teacher):,}", source)
    train, test = modeling.split(frame, schema, settings.training)
    builder = VariantBuilder(teacher, prepare_data(train, test, schema, plan), schema, plan)

    results: list[VariantResult] = []
    for spec in plan.variants:
        result = builder.build(spec)
        results.append(result)
        logger.info(_line(result))
    chosen = select_variant(results, plan.select_by)
    title = f"{name} v{info.version} ({alias}) for {plan.name}"
    table = report.markdown(title, results, chosen.name if chosen else None, plan, len(teacher))
    chart = report.chart(results, plan)
    rows = report.variant_rows(results)
    passing = [r for r in results if r.passed]
    files = {f"{r.name}.onnx": builder.model(r.name) for r in passing}
    sample = builder.data.eval.iloc[:2000]
    files |= {"report.md": table.encode(), "variants.png": chart, "sample.parquet": t.frame_bytes(sample)}
    doc = {
        "model": name,
        "source_version": info.version,
        "alias": alias,
        "budget": report.budget_dict(plan),
        "selected": chosen.name if chosen else None,
        "passing": [r.name for r in passing],
        "teacher_bytes": len(teacher),
        "teacher_metric": builder.teacher_value,
        "data_source": source,
        "created": datetime.now(UTC).isoformat(),
        "variants": rows,
        "gates": {r.name: report.gate_dict(r) for r in results},
    }
    export_dir = t.write_export(settings, name, info.version, plan.name, files, doc)
    metrics = {
        f"{row['variant']}.{k}": float(row[k])
        for row in rows
        for k in (
            "size_bytes",
            "latency_p50_ms",
            "latency_p99_ms",
            "value",
            "drop",
            "max_abs_dp",
            "mean_abs_dp",
        )
        if row[k] is not None
    }
    metrics |= {f"{r.name}.passed": float(r.passed) for r in results}
    run_id = t.log_export(
        settings,
        experiment=f"{settings.training.experiment}-edge",
        run_name=f"edge-{plan.name}-v{info.version}",
        params={
            "budget": plan.name,
            "alias": alias,
            "source_version": info.version,
            "selected": chosen.name if chosen else "none",
            "data": source,
            "budget_json": plan.model_dump_json(),
        },
        metrics=metrics,
        tags={"model": name, "source_version": str(info.version), "budget": plan.name},
        files={
            "report.md": table.encode(),
            "variants.png": chart,
            "report.csv": pd.DataFrame(rows).to_csv(index=False).encode(),
        },
    )
    create_markdown_artifact(
        key="edge-export",
        markdown=table + f"\n\nChart: `{export_dir}/variants.png`; MLflow run `{run_id}`",
        description=f"Edge variants of {name} v{info.version} for {plan.name}",
    )
    logger.info(
        "selected %s; %d of %d variants passed; export in %s",
        chosen.name if chosen else "nothing",
        len(passing),
        len(results),
        export_dir,
    )
    return ExportSummary(
        model_name=name,
        source_version=info.version,
        alias=alias,
        budget=plan.name,
        selected=chosen.name if chosen else None,
        variants=rows,
        teacher_bytes=len(teacher),
        export_dir=export_dir,
        run_id=run_id,
        data_source=source,
        report_markdown=table,
    )


# --------------------------------------------------------------------------- publish


@dataclass(frozen=True)
class PublishSummary:
    """The release an edge publish signed: version, variant, size, digest, signing keys, expiry."""

    model_name: str
    version: int
    variant: str
    source_version: int | None
    length: int
    sha256: str
    key_ids: list[str]
    expires: str


@flow(name="edge-publish", log_prints=True)
def edge_publish_flow(
    variant: str | None = None, model: str | None = None, config: str | None = None
) -> PublishSummary:
    """Sign the latest export's selected (or named) passing variant as the next release (cohort 0%)."""
    from adapters.edge_store import VariantStore

    settings = load_settings(config)
    configure(settings)
    name = model or settings.training.model_name
    export_dir, doc = VariantStore(t.paths(settings).variants).latest(name)
    chosen = variant or doc.get("selected")
    if chosen is None:
        raise NothingToPublish(f"the latest export of '{name}' has no passing variant; nothing to publish")
    if chosen not in doc["passing"]:
        row = next((r for r in doc["variants"] if r["variant"] == chosen), None)
        why = f"{row['outcome']}: {row['verdict']}" if row else "no such variant in the export"
        raise NothingToPublish(f"variant '{chosen}' is not publishable: {why}")
    model_bytes = (export_dir / f"{chosen}.onnx").read_bytes()
    manifest = t.publish(
        settings,
        model_name=name,
        variant=chosen,
        model=model_bytes,
        rows=pd.read_parquet(export_dir / "sample.parquet"),
        device_classes=doc["budget"]["device_classes"],
        min_runtime_version=doc["budget"]["min_runtime_version"],
        source_version=doc["source_version"],
    )
    keys = t.key_store(settings).root().keyids("release")
    get_run_logger().info(
        "published %s v%d (%s, %s B, sha256 %s) signed by %s",
        name,
        manifest.version,
        chosen,
        f"{manifest.target.length:,}",
        manifest.target.sha256[:16],
        ", ".join(k[:16] for k in keys),
    )
    return PublishSummary(
        name,
        manifest.version,
        chosen,
        manifest.source_version,
        manifest.target.length,
        manifest.target.sha256,
        list(keys),
        manifest.expires.isoformat(),
    )


# --------------------------------------------------------------------------- OTA rollout


@dataclass(frozen=True)
class RolloutSummary:
    """How an OTA rollout ended: its phase, stage history, devices per version and device events."""

    rollout_id: str
    model_name: str
    version: int
    variant: str
    phase: str
    devices: int
    history: list[dict[str, Any]]
    versions: dict[str, int]
    events: dict[str, int]
    rollback_version: int | None = None
    provisioned: int = 0
    notes: list[str] = field(default_factory=list)


@flow(name="edge-rollout", log_prints=True)
def edge_rollout_flow(
    devices: int = 1000,
    fleet: str = "default",
    model: str | None = None,
    config: str | None = None,
    drill: str | None = None,
) -> RolloutSummary:
    """Roll the latest release out to a simulated fleet in gated stages; roll back on a failed gate.

    ``drill`` first publishes a deliberately bad release (``broken-model`` or
    ``shifted-model``) made from the last good one, to show the defences working.
    """
    settings = load_settings(config)
    configure(settings)
    logger = get_run_logger()
    plan = settings.edge
    name = model or settings.training.model_name
    repo = t.ReleaseRepository(t.paths(settings).repo)
    version = repo.latest_version(name)
    if version == 0:
        raise RolloutConflict(f"'{name}' has no release to roll out (run `mlops edge publish`)")
    if drill is not None:
        version = t.publish_drill(settings, name, drill).version
        logger.warning("drill %s: published deliberately bad release v%d", drill, version)
    release = t.load_release(settings, name, version)
    if repo.state(name).get("last_good") == version:
        raise RolloutConflict(f"'{name}' v{version} is already rolled out to every device")

    roster = t.fleet_for(settings, fleet, t.release_sample(settings, name, version))
    new = t.provision_fleet(settings, roster, devices, name, release.device_classes[0])
    ids = roster.device_ids()[:devices]
    rollout_id = f"{name}-v{version}-{fleet}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}"
    logger.info(
        "rolling out %s v%d (%s) to %d devices (%d new) in stages %s",
        name,
        version,
        release.variant,
        len(ids),
        len(new),
        "/".join(f"{s:g}%" for s in plan.stages),
    )

    decision = start(rollout_id, name, version, plan, last_good=repo.state(name).get("last_good"))
    status = decision.status
    t.save_status(settings, fleet, status.to_dict())
    rollback_version = None
    while True:
        for effect in decision.effects:
            restored = _apply(settings, roster, fleet, rollout_id, release, effect, ids)
            rollback_version = restored or rollback_version
        if status.done:
            break
        events = t.rollout_events(settings, rollout_id)
        members = cohort(ids, release.rollout_salt, status.percent)
        gate = assess_stage(
            observe(events, members, version, status.percent), release.reference.fractions, plan.gates
        )
        decision = decide(status, gate, plan)
        status = decision.status
        t.save_status(settings, fleet, status.to_dict())
        quiet = decision.action in (Action.ADVANCE, Action.PROMOTE, Action.HOLD)
        (logger.info if quiet else logger.warning)("%s: %s", decision.action.value, decision.reason)

    summary = RolloutSummary(
        rollout_id=rollout_id,
        model_name=name,
        version=version,
        variant=release.variant,
        phase=status.phase.value,
        devices=len(ids),
        history=[h.__dict__ for h in status.history],
        versions=roster.versions(),
        events=t.TelemetryStore(t.paths(settings).telemetry).event_counts(rollout_id),
        rollback_version=rollback_version,
        provisioned=len(new),
        notes=[] if decision.effects or status.phase is Phase.SUCCEEDED else [decision.reason],
    )
    create_markdown_artifact(
        key="edge-rollout", markdown=rollout_markdown(summary), description=f"OTA rollout {rollout_id}"
    )
    return summary


def _apply(
    settings: Settings,
    roster: Fleet,
    fleet: str,
    rollout_id: str,
    release: ModelManifest,
    effect: OtaEffect,
    ids: list[str],
) -> int | None:
    """Carry out one effect of an OTA decision; the version of a restoring release, if one was made."""
    name = release.model
    if effect.kind == "serve_cohort":
        t.run_stage(settings, roster, fleet, rollout_id, name, effect.version, effect.percent, ids)
        return None
    if effect.kind == "mark_good":
        t.mark_good(settings, name, effect.version)
        return None
    return t.restore_release(settings, roster, fleet, rollout_id, release, effect.version, ids)


def rollout_markdown(s: RolloutSummary) -> str:
    """The rollout summary as the Markdown of the flow run's artifact."""
    lines = [
        f"### OTA rollout {s.rollout_id}",
        "",
        f"{s.model_name} v{s.version} ({s.variant}) to {s.devices} devices: **{s.phase}**",
        "",
        "| stage | action | outcome | reason |",
        "|--:|---|---|---|",
    ]
    lines += [f"| {h['percent']:g}% | {h['action']} | {h['outcome']} | {h['reason']} |" for h in s.history]
    lines += ["", "Devices per version: " + ", ".join(f"{k}: {v}" for k, v in s.versions.items())]
    lines += ["", "Device events: " + ", ".join(f"{k}: {v}" for k, v in s.events.items())]
    if s.rollback_version:
        lines.append(f"\nRolled back with release v{s.rollback_version}.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- a server rollout's devices step


def device_rollout_id(status: ServerStatus) -> str:
    """The OTA rollout id of a server rollout's devices step (its device telemetry is keyed by it)."""
    return f"{status.rollout_id}-devices"


def _release_for(settings: Settings, status: ServerStatus, step: DeviceStep) -> tuple[int, int | None]:
    """Compress the promoted version for the step's budget and publish it; the release's
    version and the last good release before it. A release of this version already published
    and not yet good (a repeat after a crash) is reused, not published again."""
    name = status.model_name
    repo = t.ReleaseRepository(t.paths(settings).repo)
    good = repo.state(name).get("last_good")
    last_good = None if good is None else int(good)
    latest = repo.latest_version(name)
    if latest and latest != last_good:
        existing = t.load_release(settings, name, latest)
        if existing.source_version == status.candidate_version and existing.restores is None:
            return latest, last_good
    export = edge_export_flow(alias=CHAMPION, budget=step.budget, model=name)
    if export.source_version != status.candidate_version:
        raise RolloutConflict(
            f"the champion is v{export.source_version}, not v{status.candidate_version} promoted by rollout "
            f"{status.rollout_id}: nothing published"
        )
    published = edge_publish_flow(variant=step.variant, model=name)
    return published.version, last_good


def _fleet(
    settings: Settings, status: ServerStatus, step: DeviceStep, version: int
) -> tuple[Fleet, list[str]]:
    roster = t.fleet_for(settings, step.fleet, t.release_sample(settings, status.model_name, version))
    return roster, roster.device_ids()[: step.devices]


def apply_device_effect(
    settings: Settings, status: ServerStatus, step: DeviceStep, effect: Effect
) -> ServerStatus:
    """Carry out one fleet effect of a server rollout's devices step; the status with the
    published release recorded (for a ``release`` effect), else unchanged."""
    action = effect.edge
    assert action is not None
    name = status.model_name
    if action.action == "release":
        version, last_good = _release_for(settings, status, step)
        return record_release(status, version, last_good)
    if action.action == "halt":
        get_run_logger().warning("%s", effect.description)
        return status
    dev = status.device
    assert dev is not None and dev.release_version is not None
    release = t.load_release(settings, name, dev.release_version)
    roster, ids = _fleet(settings, status, step, dev.release_version)
    if action.action == "serve_cohort":
        t.provision_fleet(settings, roster, step.devices, name, release.device_classes[0])
        roster, ids = _fleet(settings, status, step, dev.release_version)
        t.run_stage(
            settings, roster, step.fleet, device_rollout_id(status), name, action.version, action.percent, ids
        )
    elif action.action == "mark_good":
        t.mark_good(settings, name, action.version)
    else:
        t.restore_release(
            settings, roster, step.fleet, device_rollout_id(status), release, action.version, ids
        )
    return status


def device_gate(settings: Settings, status: ServerStatus, step: DeviceStep) -> GateResult | None:
    """The telemetry gate of the devices step's current cohort (``None`` before the first
    cohort is served or after the device rollout ended)."""
    dev = status.device
    st = dev.ota_status() if dev is not None else None
    if st is None or st.done or status.outstanding:
        return None
    release = t.load_release(settings, status.model_name, st.version)
    _, ids = _fleet(settings, status, step, st.version)
    events = t.rollout_events(settings, device_rollout_id(status))
    members = cohort(ids, release.rollout_salt, st.percent)
    return assess_stage(
        observe(events, members, st.version, st.percent), release.reference.fractions, settings.edge.gates
    )


@flow(name="edge-refresh", log_prints=True)
def edge_refresh_flow(config: str | None = None) -> list[tuple[str, int]]:
    """Re-sign the short-lived timestamp of every served release, so devices keep accepting it.

    Scheduled well within ``edge.timestamp_ttl_hours`` (prefect.yaml: every 6 hours); without
    it, a release that is not republished is refused as stale once its timestamp expires.

    Args:
        config: Platform config YAML (default: $MLOPS_CONFIG, else built-in defaults).
    """
    settings = load_settings(config)
    configure(settings)
    done = t.refresh_timestamps(settings)
    get_run_logger().info(
        "timestamps re-signed: %s; valid %g h",
        ", ".join(f"{m} v{v}" for m, v in done) or "nothing served yet",
        settings.edge.timestamp_ttl_hours,
    )
    return done
