"""``mlops edge``: compress for a device budget, sign releases, roll them out over the air."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mlops_cli.common import ConfigOpt, ModelOpt, console, handle_errors, progress, settings_for

edge_app = typer.Typer(
    help="Edge: compress for a device budget, sign OTA releases, roll them out to a fleet.",
    no_args_is_help=True,
)
keys_app = typer.Typer(help="Signing keys: create, rotate, show.", no_args_is_help=True)
budget_app = typer.Typer(help="Device budgets (configs/edge/*.yaml).", no_args_is_help=True)
edge_app.add_typer(keys_app, name="keys")
edge_app.add_typer(budget_app, name="budget")


class Drill(StrEnum):
    """A deliberately bad release to publish before a fleet rollout (``--drill``).

    ``broken-model`` answers NaN (fails every device's health check); ``shifted-model`` shifts
    the predictions (passes the health check, fails the prediction-shift gate).
    """

    broken_model = "broken-model"
    shifted_model = "shifted-model"


def register(app: typer.Typer) -> None:
    """Add the ``edge`` command group to the ``mlops`` CLI."""
    app.add_typer(edge_app, name="edge")


# --------------------------------------------------------------------------- export / publish


def print_export(summary) -> None:
    """Print an export's variants as a table, the selected one starred.

    Then why each variant that did not pass failed, and where the export, its report and its
    MLflow run are.
    """
    table = Table(
        title=f"{summary.model_name} v{summary.source_version} ({summary.alias}) -> {summary.budget}"
    )
    for col in (
        "variant",
        "outcome",
        "size B",
        "x teacher",
        "p50 ms",
        "p99 ms",
        "auc",
        "drop",
        "max|dp|",
        "mean|dp|",
    ):
        table.add_column(col, justify="left" if col in ("variant", "outcome") else "right")
    for row in summary.variants:
        mark = " *" if row["variant"] == summary.selected else ""
        if row["size_bytes"] is None:
            table.add_row(row["variant"] + mark, row["outcome"], *["-"] * 8)
            continue
        table.add_row(
            row["variant"] + mark,
            row["outcome"],
            f"{row['size_bytes']:,}",
            f"{summary.teacher_bytes / row['size_bytes']:.1f}",
            f"{row['latency_p50_ms']:.3f}",
            f"{row['latency_p99_ms']:.3f}",
            f"{row['value']:.4f}",
            f"{row['drop']:+.4f}",
            f"{row['max_abs_dp']:.4f}",
            f"{row['mean_abs_dp']:.5f}",
        )
    console.print(table)
    for row in summary.variants:
        if row["outcome"] != "PASS":
            console.print(f"  [dim]{row['variant']}[/]: {row['outcome']}: {row['verdict']}", soft_wrap=True)
    console.print(
        f"selected: [bold]{summary.selected or 'nothing (no variant passed)'}[/]; export in {summary.export_dir}"
    )
    console.print(
        f"report: {summary.export_dir}/report.md, chart: {summary.export_dir}/variants.png, MLflow run {summary.run_id}"
    )


@edge_app.command("export")
@handle_errors
def export(
    alias: Annotated[str, typer.Option("--alias", "-a", help="Registry alias of the teacher.")] = "champion",
    budget: Annotated[
        Path | None,
        typer.Option("--budget", "-b", help="Budget file (default: edge.budget, else pos-terminal)."),
    ] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Build, check, measure and gate every variant of the budget; keep the ones that pass."""
    settings = settings_for(config)
    from flows.edge import edge_export_flow

    with progress(f"Edge export of {model or settings.training.model_name}@{alias}"):
        summary = edge_export_flow(alias, str(budget) if budget else None, config, model)
    print_export(summary)


@edge_app.command("publish")
@handle_errors
def publish(
    variant: Annotated[
        str | None,
        typer.Option("--variant", help="Variant of the latest export (default: the selected one)."),
    ] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Sign a passing variant of the latest export as the next OTA release (cohort 0% until rolled out)."""
    settings_for(config)
    from flows.edge import edge_publish_flow

    with progress("Signing the release"):
        s = edge_publish_flow(variant, model, config)
    console.print(
        f"published [bold]{s.model_name} v{s.version}[/] ({s.variant}, {s.length:,} B, sha256 {s.sha256[:16]}...) "
        f"signed by {', '.join(s.key_ids)}; expires {s.expires}"
    )


@edge_app.command("fleet")
@handle_errors
def fleet(
    devices: Annotated[
        int, typer.Option("--devices", "-n", min=1, help="Simulated devices in the fleet.")
    ] = 1000,
    name: Annotated[
        str, typer.Option("--fleet", help="Fleet name (its devices persist under MLOPS_HOME/edge/fleets).")
    ] = "default",
    drill: Annotated[
        Drill | None, typer.Option("--drill", help="First publish a deliberately bad release.")
    ] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Roll the latest release out to a simulated fleet in gated stages (1% -> 10% -> 50% -> 100%)."""
    settings_for(config)
    from flows.edge import edge_rollout_flow

    with progress(f"OTA rollout to {devices} simulated devices"):
        s = edge_rollout_flow(devices, name, model, config, drill.value if drill else None)
    print_rollout(s)


def print_rollout(s) -> None:
    """Print a rollout's stages as a table, then devices per version, device events and any rollback."""
    table = Table(title=f"{s.model_name} v{s.version} ({s.variant}) -> {s.devices} devices: {s.phase}")
    for col in ("stage", "action", "outcome", "reason"):
        table.add_column(col, overflow="fold")
    for h in s.history:
        table.add_row(f"{h['percent']:g}%", h["action"], h["outcome"], h["reason"])
    console.print(table)
    console.print("devices per version: " + ", ".join(f"{k}: {v}" for k, v in s.versions.items()))
    console.print("device events: " + (", ".join(f"{k}: {v}" for k, v in s.events.items()) or "none"))
    if s.rollback_version:
        console.print(f"[yellow]rolled back[/]: release v{s.rollback_version} restored the last good model")
    for note in s.notes:
        console.print(note)


# --------------------------------------------------------------------------- keys


@keys_app.command("init")
@handle_errors
def keys_init(config: ConfigOpt = None) -> None:
    """Create the root key (offline), the release key (online) and root v1 (kept if they exist)."""
    from adapters.edge_store import key_store

    store = key_store(settings_for(config))
    root = store.init()
    console.print(
        f"root v{root.version}: root key {_ids(root.keyids('root'))} in {store.offline} (move it offline), "
        f"release key {_ids(root.keyids('release'))} in {store.online}; expires {root.expires.isoformat()}"
    )


def _ids(kids) -> str:
    return ", ".join(k[:16] for k in kids)


@keys_app.command("rotate")
@handle_errors
def keys_rotate(
    root: Annotated[
        bool, typer.Option("--root", help="Rotate the offline root key too, not only the online release key.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """New release key (and with --root a new root key) in the next root, signed by the root key; what is
    served is re-signed at once, so devices keep accepting it; the retired private keys are deleted."""
    from tasks.edge import rotate_keys

    old, new, served = rotate_keys(settings_for(config), root=root)
    console.print(
        f"rotated: root v{old.version} -> v{new.version}; release key {_ids(old.keyids('release'))} -> "
        f"{_ids(new.keyids('release'))}; root key {_ids(new.keyids('root'))}"
    )
    console.print(
        "re-signed with the new key: "
        + (", ".join(f"{m} v{v}" for m, v in served) or "nothing served yet")
        + "; metadata signed by the retired key is refused by devices that have the new root"
    )


@keys_app.command("show")
@handle_errors
def keys_show(config: ConfigOpt = None) -> None:
    """The current root: key ids per role, thresholds and expiry."""
    from adapters.edge_store import key_store

    store = key_store(settings_for(config))
    root = store.root()
    console.print(
        f"root v{root.version} (versions {store.root_versions()}), expires {root.expires.isoformat()}"
    )
    for role in ("root", "release"):
        console.print(f"  {role} (threshold {root.threshold(role)}):")
        for kid in root.keyids(role):
            console.print(f"    {kid}  ed25519 {root.keys[kid]}")


@edge_app.command("refresh")
@handle_errors
def refresh(config: ConfigOpt = None) -> None:
    """Re-sign the short-lived timestamp of every served release; schedule it well within
    edge.timestamp_ttl_hours, or devices refuse the served release as stale."""
    settings = settings_for(config)
    from tasks.edge import refresh_timestamps

    done = refresh_timestamps(settings)
    console.print(
        "timestamps re-signed: "
        + (", ".join(f"{m} (v{v})" for m, v in done) or "nothing served yet")
        + f"; valid {settings.edge.timestamp_ttl_hours:g} h"
    )


# --------------------------------------------------------------------------- status / budgets


@edge_app.command("status")
@handle_errors
def status(
    model: ModelOpt = None,
    name: Annotated[str, typer.Option("--fleet")] = "default",
    config: ConfigOpt = None,
) -> None:
    """Releases, the last good one, recent rollouts and what the fleet's devices run."""
    settings = settings_for(config)
    import pandas as pd

    from adapters.edge_fleet import Fleet
    from adapters.edge_store import ReleaseRepository, TelemetryStore, edge_paths
    from mlops.rollout.vocabulary import parse_phase

    paths = edge_paths(settings)
    model_name = model or settings.training.model_name
    repo = ReleaseRepository(paths.repo)
    table = Table(
        title=f"{model_name}: releases (last good: v{repo.state(model_name).get('last_good', '-')})"
    )
    for col in ("version", "variant", "bytes", "sha256", "restores", "expires"):
        table.add_column(col)
    for v in repo.versions(model_name):
        r = repo.release(model_name, v)
        table.add_row(
            str(v),
            r.variant,
            f"{r.target.length:,}",
            r.target.sha256[:16],
            str(r.restores or ""),
            r.expires.isoformat(),
        )
    console.print(table)
    rollouts = TelemetryStore(paths.telemetry).rollouts() if paths.telemetry.exists() else []
    if rollouts:
        rt = Table(title="recent rollouts")
        for col in ("rollout", "fleet", "version", "phase", "stage %", "updated"):
            rt.add_column(col)
        for r in rollouts:
            rt.add_row(
                r["rollout_id"],
                r["fleet"],
                str(r["version"]),
                parse_phase(r["phase"]).value,  # rows of older releases say rolled-back etc.
                f"{r['percent']:g}",
                str(r["updated_at"])[:19],
            )
        console.print(rt)
    roster = Fleet(paths.fleets / name, settings.dataset, pd.DataFrame())
    if roster.device_ids():
        console.print(f"fleet '{name}': " + ", ".join(f"{k}: {v}" for k, v in roster.versions().items()))


@budget_app.command("validate")
@handle_errors
def budget_validate(file: Annotated[Path, typer.Argument(help="Budget file to check.")]) -> None:
    """Check a budget file; errors name the file and the field."""
    from mlops.edge.budget import load_budget

    b = load_budget(file)
    console.print(f"[green]ok[/] {file}: budget '{b.name}', {len(b.variants)} variants")


@budget_app.command("schema")
@handle_errors
def budget_schema() -> None:
    """Print the JSON schema of a budget file."""
    from mlops.edge.budget import EdgeBudget

    console.print_json(json.dumps(EdgeBudget.model_json_schema()))


# --------------------------------------------------------------------------- demo step


def run_edge_step(settings, config: str | None, alias: str, devices: int = 200) -> None:
    """`mlops demo`'s edge step: export for the default budget, publish the selection, roll it out to a small fleet."""
    from flows.edge import edge_export_flow, edge_publish_flow, edge_rollout_flow

    with progress(f"edge: compress {settings.training.model_name}@{alias} for the default device budget"):
        exported = edge_export_flow(alias, None, config)
    console.print("[green]✓[/] edge export flow completed")
    print_export(exported)
    if exported.selected is None:
        console.print("[yellow]edge: no variant passed its gate; nothing to publish[/]")
        return
    with progress("edge: signing the selected variant"):
        published = edge_publish_flow(None, None, config)
    console.print(
        f"[green]✓[/] published {published.model_name} v{published.version} ({published.variant}, {published.length:,} B, "
        f"Ed25519 key {', '.join(published.key_ids)})"
    )
    with progress(f"edge: staged OTA rollout to {devices} simulated devices"):
        rollout = edge_rollout_flow(devices, "demo", None, config)
    console.print("[green]✓[/] edge rollout flow completed")
    print_rollout(rollout)
    console.print(
        f"drill: mlops edge fleet --devices {devices} --fleet demo --drill broken-model  (halts at 1%, every device keeps a working model)"
    )
