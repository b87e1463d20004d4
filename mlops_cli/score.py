"""``mlops score``: nightly batch scoring, backfills and champion/challenger replays."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from mlops.errors import ConfigError
from mlops_cli.common import ConfigOpt, console, handle_errors, progress, settings_for


@handle_errors
def score(
    run_date: Annotated[
        str | None,
        typer.Option(
            "--date", "-d", help="Run date to score (YYYY-MM-DD; default today, UTC).", show_default=False
        ),
    ] = None,
    input_path: Annotated[
        str | None,
        typer.Option(
            "--input",
            "-i",
            help="Parquet or CSV file, or a folder of them, to score ('{date}' is replaced by each run date); default $MLOPS_HOME/data/score/<date>.parquet.",
            show_default=False,
        ),
    ] = None,
    alias: Annotated[str, typer.Option("--alias", "-a", help="Alias of the model that scores.")] = "champion",
    start: Annotated[
        str | None, typer.Option("--from", help="Backfill: first run date (with --to).", show_default=False)
    ] = None,
    end: Annotated[
        str | None, typer.Option("--to", help="Backfill: last run date, included.", show_default=False)
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Backfill: rescore dates that are already committed.")
    ] = False,
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare",
            help="Replay: also score with this alias and write an agreement report.",
            show_default=False,
        ),
    ] = None,
    feature_history: Annotated[
        str | None,
        typer.Option(
            "--feature-history",
            help="Earlier events (Parquet/CSV file, folder or glob) for the window features of a model that takes them; default scoring.feature_history, else the input alone.",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Score a day's input on Dask with ONNX Runtime and publish it to Parquet + DuckDB, exactly once per date.

    Examples: `mlops score --date 2026-01-02`; `mlops score --from 2026-01-01 --to 2026-01-07`;
    `mlops score --date 2026-01-02 --compare challenger`.
    """
    if (start is None) != (end is None):
        raise ConfigError("--from and --to go together")
    if start is not None and run_date is not None:
        raise ConfigError("give either --date or --from/--to, not both")
    if force and start is None:
        raise ConfigError(
            "--force applies to a backfill (--from/--to); a single --date always replaces its run"
        )
    settings_for(config)
    from flows.score import backfill_flow, score_flow

    if start is not None:
        with progress(f"Backfilling {start} .. {end} with {alias}"):
            result = backfill_flow(
                start,
                end,
                input_path=input_path,
                alias=alias,
                compare=compare,
                force=force,
                config=config,
                feature_history=feature_history,
            )
        for summary in result.scored:
            print_run(summary)
        if result.skipped:
            console.print(
                f"skipped {len(result.skipped)} committed dates: {', '.join(str(d) for d in result.skipped)} (--force rescores them)"
            )
        if not result.scored:
            console.print("nothing to score")
        return
    with progress(f"Scoring {run_date or 'today'} with {alias}"):
        summary = score_flow(
            run_date=run_date,
            input_path=input_path,
            alias=alias,
            compare=compare,
            config=config,
            feature_history=feature_history,
        )
    print_run(summary)


def print_run(summary) -> None:
    """What a run wrote and where to query it."""
    s = summary
    rate = s.rows_out / max(sum(v for k, v in s.seconds.items() if not k.startswith("workers_")), 1e-9)
    console.print(
        f"[green]✓[/] {s.run_date}: scored {s.rows_out:,} rows with {s.model_name} v{s.model_version} ({s.alias}) "
        f"in {s.partitions} partitions, {rate:,.0f} rows/s -> {s.output_path}"
    )
    console.print(
        f"  query: mlops query \"SELECT decision, count(*) FROM scores WHERE run_date = '{s.run_date}' GROUP BY 1\""
    )
    if s.comparison is not None:
        c = s.comparison
        table = Table(
            title=f"v{s.model_version} vs v{s.compared_version} on {c.rows:,} rows (table score_comparisons)"
        )
        for col in (
            "correlation",
            "decision agreement",
            "PSI",
            "KS",
            "decision rate ref",
            "decision rate cmp",
        ):
            table.add_column(col, justify="right")
        table.add_row(
            *(
                f"{v:.4f}"
                for v in (
                    c.correlation,
                    c.decision_agreement,
                    c.psi,
                    c.ks,
                    c.decision_rate_a,
                    c.decision_rate_b,
                )
            )
        )
        console.print(table)
        if c.segments:
            top = c.segments[0]
            console.print(
                f"  largest segment difference: {top.column}={top.value} mean score {top.mean_a:.4f} -> {top.mean_b:.4f}"
            )


@handle_errors
def query(
    sql: Annotated[
        str,
        typer.Argument(
            help='SQL over the warehouse, e.g. "SELECT decision, count(*) FROM scores GROUP BY 1".'
        ),
    ],
    limit: Annotated[int, typer.Option("--limit", min=1, help="Rows to print at most.")] = 50,
    config: ConfigOpt = None,
) -> None:
    """Query the DuckDB warehouse read-only: ``scores`` (every committed run), ``score_runs``, replay reports.

    Exactly one SELECT is accepted; it can read the store and nothing else (no other file,
    no COPY, ATTACH, SET, INSTALL/LOAD, no second statement), and a refusal is one line, exit 3.
    """
    from adapters import storage

    settings = settings_for(config)
    if not settings.warehouse_path.exists():
        raise ConfigError(f"{settings.warehouse_path}: no warehouse yet; run `mlops score` first")
    result = storage.query(settings.home_path, sql, limits=settings.query)  # refused: one line, exit 3
    table = Table(
        caption=f"{result.num_rows:,} rows" + (f" (first {limit} shown)" if result.num_rows > limit else "")
    )
    for name in result.column_names:
        table.add_column(name)
    for row in result.slice(0, limit).to_pylist():
        table.add_row(*("" if v is None else str(v) for v in row.values()))
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``mlops score`` and ``mlops query`` to the CLI."""
    app.command("score")(score)
    app.command("query")(query)
