"""``mlops demo``: the platform end to end on the embedded defaults, with a summary.

Eight numbered steps, each timed (the summary lists the times):

1. generate card transactions          5. edge: compress, sign, OTA rollout
2. training flow (v1: champion)        6. start the online service and simulated users
3. batch scoring flow                  7. train a challenger (v2) on more data
4. stream: events -> window features   8. safe rollout of v2 against the live service
   -> scores -> DuckDB
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from rich.panel import Panel
from rich.table import Table

from adapters.datasets import write_parquet
from mlops.datagen import generate_blocks
from mlops.settings import Settings
from mlops_cli.common import console, progress

SCORE_ROWS = 200_000
STEPS = 8


class DemoSteps:
    """Numbers the demo's steps ``[k/N]`` in one sequence and times each one."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.timings: list[tuple[str, float]] = []

    @contextmanager
    def step(self, title: str, *, spinner: bool = True) -> Iterator[None]:
        """Run one numbered step: announce it, show a spinner fed by the flow's log lines
        (``spinner=False`` for a step that shows its own progress), then print its time."""
        label = f"[{len(self.timings) + 1}/{self.total}] {title}"
        started = time.perf_counter()
        if spinner:
            with progress(label):
                yield
        else:
            console.print(f"[bold]{label}[/]")
            yield
        took = time.perf_counter() - started
        self.timings.append((title, took))
        console.print(f"[green]✓[/] {label} [dim]({took:.0f} s)[/]")

    def table(self, total_s: float) -> Table:
        """The step times as a table, with the whole run's wall time."""
        table = Table(title="demo steps", show_edge=False)
        table.add_column("step")
        table.add_column("seconds", justify="right")
        for i, (title, took) in enumerate(self.timings, 1):
            table.add_row(f"{i}/{self.total} {title}", f"{took:.0f}")
        table.add_row("[bold]total (wall)[/]", f"[bold]{total_s:.0f}[/]")
        return table


def run_demo(settings: Settings, config: str | None, rows: int, rollout_plan: str | None = None) -> None:
    """Run the eight demo steps on ``settings``' home and print a summary with their times."""
    from flows.score import score_flow
    from flows.train import train_flow
    from mlops.scoring import default_input
    from mlops_cli.demo_rollout import run_rollout_demo
    from mlops_cli.demo_stream import run_stream_step
    from mlops_cli.edge import run_edge_step
    from mlops_cli.main import _print_training
    from mlops_cli.score import print_run

    started = time.perf_counter()
    home = settings.home_path
    steps = DemoSteps(STEPS)
    console.rule(f"[bold]mlops demo[/] (state in {home})")

    train_path = settings.data_dir / "train.parquet"
    with steps.step(f"generate {rows:,} card transactions"):
        write_parquet(generate_blocks(rows, seed=1), train_path)
    console.print(f"data: {rows:,} rows -> {train_path}")

    with steps.step("training flow: validate -> train -> ONNX parity -> evaluate -> register"):
        summary = train_flow(str(train_path), config)
    _print_training(summary)

    # A day of new transactions, scored the way the nightly deployment does it.
    now = datetime.now(UTC)
    day_path = default_input(settings.data_dir, now.date())
    alias = "champion" if summary.promoted_to_champion else "challenger"
    with steps.step(
        f"batch scoring flow: {SCORE_ROWS:,} rows on Dask with ONNX Runtime -> Parquet -> DuckDB"
    ):
        write_parquet(
            generate_blocks(
                SCORE_ROWS,
                seed=2,
                start=now.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None),
            ),
            day_path,
        )
        scored = score_flow(run_date=now.date().isoformat(), alias=alias, config=config)
    print_run(scored)

    # The same champion on the event stream: rolling windows per user, scores, DuckDB.
    with steps.step("stream flow: events -> window features -> scores -> DuckDB", spinner=False):
        streamed = run_stream_step(settings, config, alias)

    # Edge: compress the model for card terminals, sign it, roll it out to a small simulated fleet.
    with steps.step("edge: compress for card terminals -> sign -> OTA rollout to 200 devices", spinner=False):
        run_edge_step(settings, config, alias)

    # Last act: a better challenger rolled out against the live service (steps 6-8).
    rolled = run_rollout_demo(settings, config, rows, rollout_plan, steps)

    elapsed = time.perf_counter() - started
    mlflow_ui = f"mlflow ui --backend-store-uri {settings.tracking_uri} --port 5000"
    prefect_ui = f"PREFECT_HOME={settings.prefect_home} prefect server start"
    console.print(steps.table(elapsed))
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
                    f"streamed  {streamed.events:,} events with {streamed.model} ({streamed.events_per_second:,.0f}/s)"
                    f" -> {streamed.output}",
                    'query     mlops query "SELECT run_date, decision, count(*) FROM scores GROUP BY ALL ORDER BY ALL"',
                    f"MLflow UI {mlflow_ui}",
                    f"Prefect UI {prefect_ui}",
                    f"took      {elapsed:.0f} s",
                ]
            ),
            title="demo summary",
        )
    )
