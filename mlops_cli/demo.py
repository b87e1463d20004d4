"""``mlops demo``: the platform end to end on the embedded defaults, with a summary."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from rich.panel import Panel

from adapters.datasets import write_parquet
from mlops.datagen import generate_blocks
from mlops.settings import Settings
from mlops_cli.common import console, progress

SCORE_ROWS = 200_000


def run_demo(settings: Settings, config: str | None, rows: int, rollout_plan: str | None = None) -> None:
    from flows.score import score_flow
    from flows.train import train_flow
    from mlops.scoring import default_input
    from mlops_cli.main import _print_training
    from mlops_cli.score import print_run

    started = time.perf_counter()
    home = settings.home_path
    console.rule(f"[bold]mlops demo[/] (state in {home})")

    train_path = settings.data_dir / "train.parquet"
    with progress(f"1/3 generating {rows:,} card transactions"):
        write_parquet(generate_blocks(rows, seed=1), train_path)
    console.print(f"[green]✓[/] data: {rows:,} rows -> {train_path}")

    with progress("2/3 training flow: validate -> train -> ONNX parity -> evaluate -> register"):
        summary = train_flow(str(train_path), config)
    console.print("[green]✓[/] training flow completed")
    _print_training(summary)

    # A day of new transactions, scored the way the nightly deployment does it.
    now = datetime.now(UTC)
    day_path = default_input(settings.data_dir, now.date())
    write_parquet(
        generate_blocks(
            SCORE_ROWS, seed=2, start=now.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
        ),
        day_path,
    )
    alias = "champion" if summary.promoted_to_champion else "challenger"
    with progress(
        f"3/3 batch scoring flow: {SCORE_ROWS:,} rows on Dask with ONNX Runtime -> Parquet -> DuckDB"
    ):
        scored = score_flow(run_date=now.date().isoformat(), alias=alias, config=config)
    console.print("[green]✓[/] batch scoring flow completed")
    print_run(scored)

    # Edge: compress the model for card terminals, sign it, roll it out to a small simulated fleet.
    from mlops_cli.edge import run_edge_step

    run_edge_step(settings, config, "champion" if summary.promoted_to_champion else "challenger")

    # Last act: a better challenger rolled out against the live service (mlops_cli/demo_rollout.py).
    from mlops_cli.demo_rollout import run_rollout_demo

    rolled = run_rollout_demo(settings, config, rows, rollout_plan)

    elapsed = time.perf_counter() - started
    mlflow_ui = f"mlflow ui --backend-store-uri {settings.tracking_uri} --port 5000"
    prefect_ui = f"PREFECT_HOME={settings.prefect_home} prefect server start"
    console.print(
        Panel.fit(
            "\n".join(
                [
                    f"trained   {len(summary.candidates)} candidates, selected [bold]{summary.selected}[/]",
                    f"          roc_auc {summary.metrics['roc_auc']:.4f}  pr_auc {summary.metrics['pr_auc']:.4f}",
                    f"registered {summary.model_name} v{summary.version} (challenger)"
                    + (" and promoted to champion" if summary.promoted_to_champion else ""),
                    f"history   mlops registry history {summary.model_name}",
                    f"rollout   {rolled.rollout_id}: {rolled.phase} (v{rolled.candidate_version} vs v{rolled.stable_version},"
                    f" {rolled.seconds:.0f} s, approval auto-answered) -> {rolled.report}",
                    f"scored    {scored.rows_out:,} rows for {scored.run_date} with v{scored.model_version} ({alias})"
                    f" -> {scored.output_path}",
                    'query     mlops query "SELECT run_date, decision, count(*) FROM scores GROUP BY ALL ORDER BY ALL"',
                    f"MLflow UI {mlflow_ui}",
                    f"Prefect UI {prefect_ui}",
                    f"took      {elapsed:.0f} s",
                ]
            ),
            title="demo summary",
        )
    )
