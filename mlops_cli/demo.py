"""``mlops demo``: the platform end to end on the embedded defaults, with a summary."""

from __future__ import annotations

import time

from rich.panel import Panel

from adapters.datasets import write_parquet
from mlops.datagen import generate_blocks
from mlops.settings import Settings
from mlops_cli.common import console, progress


def run_demo(settings: Settings, config: str | None, rows: int) -> None:
    from flows.train import train_flow
    from mlops_cli.main import _print_training

    started = time.perf_counter()
    home = settings.home_path
    console.rule(f"[bold]mlops demo[/] (state in {home})")

    train_path = settings.data_dir / "train.parquet"
    with progress(f"1/2 generating {rows:,} card transactions"):
        write_parquet(generate_blocks(rows, seed=1), train_path)
    console.print(f"[green]✓[/] data: {rows:,} rows -> {train_path}")

    with progress("2/2 training flow: validate -> train -> ONNX parity -> evaluate -> register"):
        summary = train_flow(str(train_path), config)
    console.print("[green]✓[/] training flow completed")
    _print_training(summary)

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
                    f"MLflow UI {mlflow_ui}",
                    f"Prefect UI {prefect_ui}",
                    f"took      {elapsed:.0f} s",
                ]
            ),
            title="demo summary",
        )
    )
