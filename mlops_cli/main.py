"""``mlops``: the platform's command line.

Heavy libraries (Prefect, MLflow, scikit-learn) are imported inside the commands that
need them, so ``mlops --help`` and config commands answer at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from mlops.errors import ConfigError, DataError
from mlops_cli.common import ConfigOpt, ModelOpt, console, handle_errors, progress, set_verbose, settings_for

app = typer.Typer(
    name="mlops",
    help="Workflow-orchestrated MLOps: train, register, promote, score, serve, roll out and ship models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Show and check configuration.", no_args_is_help=True)
data_app = typer.Typer(help="Generate and inspect datasets.", no_args_is_help=True)
registry_app = typer.Typer(
    help="Model registry: versions, aliases and their audit history.", no_args_is_help=True
)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(registry_app, name="registry")


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's own log lines.")] = False,
) -> None:
    """State lives under $MLOPS_HOME (default ./.mlops); see `mlops config show`."""
    set_verbose(verbose)


# --------------------------------------------------------------------------- config


@config_app.command("show")
@handle_errors
def config_show(
    config: ConfigOpt = None,
    schema: Annotated[
        bool, typer.Option("--schema", help="Print the JSON schema of the config instead.")
    ] = False,
) -> None:
    """Print the effective configuration (defaults < file < MLOPS__* env < MLOPS_HOME) as YAML, secrets masked."""
    import yaml

    from mlops.redact import redact
    from mlops.settings import Settings, load_settings

    if schema:
        console.print_json(json.dumps(Settings.model_json_schema()))
        return
    settings = load_settings(config)
    shown = redact(settings.model_dump(mode="json"))  # tokens, passwords, keys: never printed
    console.print(yaml.safe_dump(shown, sort_keys=False), end="", markup=False)


@config_app.command("validate")
@handle_errors
def config_validate(
    file: Annotated[Path, typer.Argument(help="Config file to check.")],
    kind: Annotated[
        str,
        typer.Option(
            "--kind",
            help="platform | rollout-plan | edge-budget (default: by folder: configs/rollout/ "
            "holds plans, configs/edge/ budgets, anything else is platform config).",
        ),
    ] = "auto",
) -> None:
    """Check one config file: the platform config, a rollout plan or an edge budget."""
    from mlops.edge.budget import load_budget
    from mlops.rollout.plan import load_plan
    from mlops.settings import Settings, read_yaml, validate_model

    if kind == "auto":
        parent = file.resolve().parent.name
        kind = {"rollout": "rollout-plan", "edge": "edge-budget"}.get(parent, "platform")
    if kind == "rollout-plan":
        load_plan(file)
    elif kind == "edge-budget":
        load_budget(file)
    elif kind == "platform":
        validate_model(Settings, read_yaml(file) | {"home": "."}, str(file))
    else:
        raise typer.BadParameter(f"--kind {kind!r}: expected platform, rollout-plan or edge-budget")
    console.print(f"[green]ok[/] {file} ({kind})")


# --------------------------------------------------------------------------- data


@data_app.command("generate")
@handle_errors
def data_generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write.")],
    rows: Annotated[int, typer.Option("--rows", "-n", min=1, help="Number of transactions.")] = 100_000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: same seed, same data.")] = 0,
    drift: Annotated[
        float, typer.Option("--drift", min=0.0, max=1.0, help="0 = reference world, 1 = strongly drifted.")
    ] = 0.0,
    start: Annotated[
        str, typer.Option("--start", help="Day the transactions happen (YYYY-MM-DD).")
    ] = "2026-01-01",
) -> None:
    """Write synthetic card transactions (features, user and transaction ids, fraud label) to Parquet."""
    from datetime import datetime

    from rich.progress import Progress

    from adapters.datasets import write_parquet
    from mlops.datagen import BLOCK_ROWS, generate_blocks

    if out.suffix.lower() not in {".parquet", ".pq"}:
        raise DataError(f"{out}: --out must be a .parquet file")
    try:
        day = datetime.strptime(start, "%Y-%m-%d")
    except ValueError:
        raise DataError(f"--start {start!r} is not a date (YYYY-MM-DD)") from None
    with Progress(console=console, transient=True) as bar:
        job = bar.add_task(f"generating {rows:,} rows", total=rows)

        def blocks():
            for block in generate_blocks(rows, seed=seed, drift=drift, start=day):
                yield block
                bar.advance(job, len(block))

        written = write_parquet(blocks(), out)
    console.print(
        f"wrote {written:,} rows to {out} (seed {seed}, drift {drift}, {-(-rows // BLOCK_ROWS)} blocks)"
    )


# --------------------------------------------------------------------------- training


def _default_training_data(settings) -> Path:
    return settings.data_dir / "train.parquet"


@app.command()
@handle_errors
def train(
    config: ConfigOpt = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data", "-d", help="Training data (.parquet/.csv); default $MLOPS_HOME/data/train.parquet."
        ),
    ] = None,
    tenant: Annotated[
        str | None,
        typer.Option("--tenant", help="Register the model as '<model>--<tenant>', that tenant's own model."),
    ] = None,
) -> None:
    """Validate data, train the configured candidates, export to ONNX, check parity, register the best."""
    settings = settings_for(config)
    if tenant is not None:
        import os

        from mlops.tenancy import tenant_model_name

        # The flow reads its settings itself: the override reaches it through the environment.
        os.environ["MLOPS__TRAINING__MODEL_NAME"] = tenant_model_name(settings.training.model_name, tenant)
        settings = settings_for(config)
    path = data or str(_default_training_data(settings))
    if not Path(path).exists():
        raise DataError(f"{path}: no training data (generate some with `mlops data generate --out {path}`)")
    from flows.train import train_flow

    with progress(f"Training {settings.training.model_name} on {path}"):
        summary = train_flow(path, config)
    _print_training(summary)


def _print_training(summary) -> None:
    table = Table(title=f"{summary.model_name}: candidates", show_lines=False)
    names = ["roc_auc", "pr_auc", "log_loss", "ece", "latency_p50_ms", "latency_p99_ms"]
    table.add_column("candidate")
    for n in names:
        table.add_column(n, justify="right")
    for label, metrics in summary.candidates.items():
        mark = " *" if label == summary.selected else ""
        table.add_row(label + mark, *(f"{metrics[n]:.4f}" for n in names))
    console.print(table)
    promoted = " and champion" if summary.promoted_to_champion else ""
    console.print(
        f"registered [bold]{summary.model_name} v{summary.version}[/] as challenger{promoted} (MLflow run {summary.run_id})"
    )
    console.print(f"promotion gate: {escape(summary.gate)}", soft_wrap=True)
    view = summary.lineage.get("lineage.feature_view")
    if view:
        windows = len(json.loads(summary.lineage["lineage.feature_windows"]))
        console.print(f"feature view {view}: {windows} window features as inputs, point-in-time checked")


# --------------------------------------------------------------------------- registry


@app.command()
@handle_errors
def promote(
    alias: Annotated[str, typer.Option("--alias", "-a", help="Alias to move (champion, challenger, ...).")],
    version: Annotated[
        int, typer.Option("--version", min=1, help="Model version the alias should point at.")
    ],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why: recorded in the audit history.")],
    expect_current: Annotated[
        str | None,
        typer.Option(
            "--expect-current", help="Move only if the alias is at this version now ('none' = unset)."
        ),
    ] = None,
    model: ModelOpt = None,
    skip_gate: Annotated[
        bool, typer.Option("--skip-gate", help="Move to champion without the metric gate (audited as such).")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Move an alias to a version: compare-and-set, gated for champion, recorded in the audit history."""
    from mlops.registry_model import parse_expect

    settings = settings_for(config)
    try:
        expect = parse_expect(expect_current)
    except ValueError as exc:
        raise ConfigError(f"--expect-current: {exc}") from None
    from registry.mlflow_registry import ModelRegistry
    from registry.promotion import promote as do_promote

    name = model or settings.training.model_name
    result = do_promote(
        settings,
        ModelRegistry(settings),
        name=name,
        alias=alias,
        version=version,
        reason=reason,
        expect_current=expect,
        skip_gate=skip_gate,
    )
    if result.gate is not None:
        console.print(f"gate {result.gate.outcome.value}: {escape(result.gate.reason)}", soft_wrap=True)
        for line in result.gate.evidence:
            console.print(f"  {escape(line)}", soft_wrap=True)
    if not result.moves:
        console.print(f"{name}@{alias} is already v{version}; nothing moved")
    for move in result.moves:
        console.print(f"moved {move.describe()}")


@registry_app.command("list")
@handle_errors
def registry_list(
    model: Annotated[str | None, typer.Argument(help="Registered model (default: from config).")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per version, for scripts.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Versions of a model with their aliases, key metrics and lineage."""
    settings = settings_for(config)
    from registry.mlflow_registry import ModelRegistry

    name = model or settings.training.model_name
    versions = ModelRegistry(settings).versions(name)
    if as_json:
        for v in versions:
            print(
                json.dumps(
                    {
                        "model": name,
                        "version": v.version,
                        "aliases": list(v.aliases),
                        "metrics": v.metrics,
                        "tags": v.tags,
                        "created_ms": v.created_ms,
                    }
                )
            )
        return
    if not versions:
        console.print(f"model '{name}' has no versions")
        return
    table = Table(title=f"{name}")
    for col in (
        "version",
        "aliases",
        "candidate",
        "roc_auc",
        "pr_auc",
        "log_loss",
        "data",
        "features",
        "created",
    ):
        table.add_column(col)
    from datetime import UTC, datetime

    for v in versions:
        m = v.metrics
        table.add_row(
            str(v.version),
            ", ".join(v.aliases),
            v.tags.get("lineage.candidate", ""),
            *(f"{m[k]:.4f}" if k in m else "" for k in ("roc_auc", "pr_auc", "log_loss")),
            v.tags.get("lineage.data_fingerprint", ""),
            v.tags.get("lineage.feature_view", ""),
            datetime.fromtimestamp(v.created_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S"),
        )
    console.print(table)


@registry_app.command("history")
@handle_errors
def registry_history(
    model: Annotated[
        str | None, typer.Argument(help="Registered model (default: from config; 'all' for every model).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", "-n", min=1, help="Only the newest N moves.")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Every alias move: when, who, from -> to, why and the run that made it."""
    settings = settings_for(config)
    from registry.audit import AuditLedger

    name = None if model == "all" else (model or settings.training.model_name)
    moves = AuditLedger(settings.audit_db_uri).history(name, limit)
    table = Table(title=f"alias history: {name or 'all models'}")
    for col in ("#", "at (UTC)", "model", "alias", "from", "to", "action", "actor", "reason", "run"):
        table.add_column(col, overflow="fold")
    for m in moves:
        table.add_row(
            str(m.seq),
            m.at,
            m.model,
            m.alias,
            "-" if m.from_version is None else str(m.from_version),
            "-" if m.to_version is None else str(m.to_version),
            m.action,
            m.actor,
            m.reason,
            (m.run_id or "")[:12],
        )
    console.print(table)


# --------------------------------------------------------------------------- demo


@app.command()
@handle_errors
def demo(
    rows: Annotated[int, typer.Option("--rows", min=1000, help="Training rows to generate.")] = 60_000,
    rollout_plan: Annotated[
        Path | None,
        typer.Option(
            "--rollout-plan",
            exists=True,
            dir_okay=False,
            help="Rollout plan for the last act (default: configs/rollout/demo-live.yaml).",
        ),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Run the platform end to end on embedded defaults: train -> register -> batch-score -> edge -> safe rollout."""
    from mlops.rollout.plan import load_plan
    from mlops_cli.demo import run_demo

    if rollout_plan is not None:
        load_plan(rollout_plan)  # a bad plan fails now, naming file and field, before anything runs
    run_demo(settings_for(config), config, rows, str(rollout_plan) if rollout_plan else None)


# --------------------------------------------------------------------------- command groups
# Each capability keeps its commands in its own module and registers them here.
from mlops_cli import server as _server  # noqa: E402

_server.register(app)
from mlops_cli import score as _score  # noqa: E402

_score.register(app)
from mlops_cli import serve as _serve  # noqa: E402

_serve.register(app)
from mlops_cli import edge as _edge  # noqa: E402

_edge.register(app)
from mlops_cli import rollout as _rollout  # noqa: E402

_rollout.register(app)
from mlops_cli import stream as _stream  # noqa: E402

_stream.register(app)
from mlops_cli import tenants as _tenants  # noqa: E402

_tenants.register(app)


if __name__ == "__main__":
    app()
