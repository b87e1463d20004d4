"""Batch scoring flows: one run date (``score_flow``) and a range of them (``backfill_flow``).

pin the model version -> plan partitions -> sweep the store, open staging -> on Dask, per partition:
read -> validate (the GX suite's checks on Arrow; GX reports failures) -> score (ONNX Runtime) -> stage a Parquet part ->
commit all parts at once -> (replay) write the agreement report.

Exactly once per run date: parts are staged privately and ``commit`` publishes the whole
run in one DuckDB transaction (see ``adapters.storage``). A partition that fails
validation stops the run before the commit; its staging is dropped and whatever was
published for the date stays as it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from adapters.runtime import configure
from adapters.storage import RunRecord, new_run_id
from flows.params import AliasParam
from mlops.errors import ConfigError, DataError, ValidationFailed
from mlops.features import FeatureSet, check_view, feature_views, model_schema
from mlops.registry_model import CHAMPION
from mlops.scoring import (
    date_range,
    dates_to_score,
    input_for,
    merge_failures,
    missing_input_message,
    parse_date,
    resolve_run_date,
)
from mlops.settings import Settings, load_settings
from mlops.stats import AgreementReport, agreement_report, merge_all
from tasks.scoring import (
    PartitionJob,
    PinnedModel,
    abort_staging,
    add_window_features,
    commit_run,
    committed_dates,
    open_staging,
    pin_model,
    plan_input,
    prepare_input,
    record_comparison,
    remove_workdir,
    score_partitions,
)


@dataclass(frozen=True)
class ScoreSummary:
    """What one scoring run did."""

    run_date: date
    run_id: str
    input_path: str
    model_name: str
    model_version: int
    alias: str
    rows_in: int
    rows_out: int
    partitions: int
    output_path: str
    warehouse: str
    seconds: dict[str, float] = field(default_factory=dict)
    comparison: AgreementReport | None = None
    compared_version: int | None = None


@dataclass(frozen=True)
class BackfillSummary:
    """What a backfill did: the dates it scored and those it skipped as committed already."""

    scored: tuple[ScoreSummary, ...]
    skipped: tuple[date, ...]


def _segments(settings: Settings) -> tuple[str, ...]:
    schema = settings.dataset
    wanted = settings.scoring.compare_segments or schema.categorical_names
    unknown = [c for c in wanted if c not in schema.categorical_names]
    if unknown:
        raise ConfigError(
            f"scoring.compare_segments: {', '.join(unknown)} not categorical features of {schema.name} "
            f"(segments must have a closed set of values: {', '.join(schema.categorical_names)})"
        )
    return tuple(wanted)


def _resolve_input(settings: Settings, input_path: str | None, day: date) -> Path:
    path = input_for(input_path, settings.data_dir, day)
    if not path.exists():
        raise DataError(missing_input_message(path, day))
    return path


def _today() -> date:
    return datetime.now(UTC).date()


@flow(name="score", log_prints=True)
def score_flow(
    run_date: date | None = None,
    input_path: str | None = None,
    alias: AliasParam = CHAMPION,
    compare: AliasParam | None = None,
    version: int | None = None,
    config: str | None = None,
    feature_history: str | None = None,
) -> ScoreSummary:
    """Score one day's input with the model behind ``alias`` and publish it for ``run_date``.

    ``run_date`` defaults to today (UTC); ``input_path`` to ``$MLOPS_HOME/data/score/<date>.parquet``
    (``{date}`` in it is replaced by the run date). ``version`` pins a version instead of
    resolving ``alias`` (a backfill pins once for all its dates). ``compare`` names a second
    alias scored on the same rows; its agreement with the first goes to the warehouse.

    Args:
        run_date: The day to score and publish (default: today, UTC).
        input_path: Input Parquet or CSV file or folder (default: $MLOPS_HOME/data/score/<run_date>.parquet).
        alias: Registry alias of the model to score with (champion, challenger, ...).
        compare: A second alias scored on the same rows for a champion/challenger report.
        version: A model version to pin instead of resolving the alias.
        config: Platform config YAML (default: $MLOPS_CONFIG, else built-in defaults).
        feature_history: Earlier events for window features (default: scoring.feature_history, else none).
    """
    started = datetime.now(UTC)
    settings = load_settings(config)
    configure(settings)
    logger = get_run_logger()
    day = resolve_run_date(run_date, _today())
    source = _resolve_input(settings, input_path, day)
    segments = _segments(settings) if compare else ()
    laps = _Laps()
    models: list[PinnedModel] = [pin_model(settings, alias, version)]
    if compare:
        models.append(pin_model(settings, compare))
    views = feature_views(settings)  # a model trained on another view than these is refused
    model_views = [check_view(views, m.ref.view, m.ref.label()) for m in models]
    history = feature_history or settings.scoring.feature_history
    logger.info("scoring %s for %s with %s", source, day, " vs ".join(m.ref.label() for m in models))
    laps.lap("pin")
    run_id = new_run_id()
    workdir = str(settings.home_path / "tmp" / f"score-input-{run_id}")
    try:
        return _score_run(
            settings,
            source,
            day,
            run_id,
            workdir,
            alias,
            models,
            segments,
            started,
            laps,
            model_views,
            history,
        )
    finally:
        remove_workdir(workdir)


class _Laps:
    """Wall seconds of a run's phases, each measured from the end of the previous one."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._mark = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._mark, 3)
        self._mark = now


def _score_run(
    settings: Settings,
    source: Path,
    day: date,
    run_id: str,
    workdir: str,
    alias: str,
    models: list[PinnedModel],
    segments: tuple[str, ...],
    started: datetime,
    laps: _Laps,
    model_views: list[FeatureSet | None],
    history: str | None,
) -> ScoreSummary:
    """Read (CSV through a Parquet copy in ``workdir``), add window features when a model
    takes them, plan, score, validate and commit one run."""
    logger = get_run_logger()
    root = str(settings.home_path)
    seconds, lap = laps.seconds, laps.lap
    ref = models[0].ref
    compare = len(models) > 1
    parquet = prepare_input(str(source), workdir, settings.scoring.rows_per_partition, settings.dataset)
    views = tuple(dict.fromkeys(v for v in model_views if v is not None))
    if views:
        parquet = add_window_features(
            parquet, workdir, views, settings.dataset, history, settings.scoring.rows_per_partition
        )
        lap("features")
    windows = tuple(dict.fromkeys(n for v in views for n in v.names))
    plan = plan_input(parquet, settings.scoring.rows_per_partition, settings.dataset.min_rows)
    if not plan:
        raise ValidationFailed(
            f"{source}: 1 of 1 expectations failed",
            [f"table: expected at least {settings.dataset.min_rows} rows, got 0"],
        )
    rows_in = sum(p.rows for p in plan)
    lap("plan")

    staged = open_staging(root, day, run_id)
    schema = settings.dataset
    columns = tuple(dict.fromkeys(schema.key_columns + schema.feature_names + windows))
    fr_id = flow_run.get_id()
    jobs = [
        PartitionJob(
            partition=p,
            columns=columns,
            schema=schema,
            root=root,
            run_date=day,
            run_id=run_id,
            models=tuple(m.ref for m in models),
            ort_threads=settings.scoring.ort_threads,
            flow_run_id=str(fr_id) if fr_id else None,
            segments=segments,
            model_schemas=tuple(model_schema(schema, v) for v in model_views) if views else (),
            windows=windows,
        )
        for p in plan
    ]
    try:
        results = score_partitions(settings, jobs, models)
    except BaseException:
        abort_staging(staged)
        raise
    failed = [r for r in results if r.failures]
    if failed:
        abort_staging(staged)
        lines = merge_failures([(plan[r.index].describe(), r.failures) for r in failed])
        raise ValidationFailed(
            f"{source}: {len(failed)} of {len(plan)} partitions failed validation; nothing was written", lines
        )
    lap("score")

    for r in results:  # CPU seconds the workers spent, summed over partitions
        for phase, s in r.seconds.items():
            seconds[f"workers_{phase}"] = round(seconds.get(f"workers_{phase}", 0.0) + s, 3)
    record = RunRecord(
        model_name=ref.name,
        model_version=str(ref.version),
        alias=ref.alias,
        flow_run_id=str(fr_id) if fr_id else None,
        rows_in=rows_in,
        started_at=started,
        finished_at=datetime.now(UTC),
        phase_seconds=seconds,
    )
    info = commit_run(staged, [r.part for r in results if r.part is not None], record)
    lap("commit")
    logger.info("committed %s rows for %s (run %s)", f"{info.rows_out:,}", day, run_id)

    report = None
    if compare:
        report = agreement_report(
            merge_all([r.agreement for r in results if r.agreement is not None]), settings.scoring.psi_bins
        )
        record_comparison(root, day, run_id, models[0].ref, models[1].ref, report)
        logger.info(
            "%s vs %s: correlation %.4f, decision agreement %.4f, PSI %.4f",
            models[0].ref.label(),
            models[1].ref.label(),
            report.correlation,
            report.decision_agreement,
            report.psi,
        )

    summary = ScoreSummary(
        run_date=day,
        run_id=run_id,
        input_path=str(source),
        model_name=ref.name,
        model_version=ref.version,
        alias=alias,
        rows_in=rows_in,
        rows_out=info.rows_out,
        partitions=len(plan),
        output_path=str(settings.home_path / "scores" / f"run_date={day.isoformat()}"),
        warehouse=str(settings.warehouse_path),
        seconds=seconds,
        comparison=report,
        compared_version=models[1].ref.version if compare else None,
    )
    create_markdown_artifact(
        key="score-run", markdown=_markdown(summary), description=f"Batch scoring of {day}"
    )
    return summary


def _markdown(s: ScoreSummary) -> str:
    lines = [
        f"Scored **{s.rows_out:,}** rows of `{s.input_path}` for **{s.run_date}** with "
        f"**{s.model_name} v{s.model_version}** (`{s.alias}`) in {s.partitions} partitions.",
        "",
        f"Query: `SELECT * FROM scores WHERE run_date = '{s.run_date}'` in `{s.warehouse}`",
        "",
        "| phase | seconds |",
        "|---|---:|",
        *(f"| {k} | {v:.2f} |" for k, v in s.seconds.items()),
    ]
    if s.comparison is not None:
        c = s.comparison
        lines += [
            "",
            f"Replay against v{s.compared_version}: correlation {c.correlation:.4f}, decision agreement "
            f"{c.decision_agreement:.4f}, PSI {c.psi:.4f}, KS {c.ks:.4f}",
        ]
    return "\n".join(lines)


@flow(name="score-backfill", log_prints=True)
def backfill_flow(
    start: str,
    end: str,
    input_path: str | None = None,
    alias: AliasParam = CHAMPION,
    compare: AliasParam | None = None,
    force: bool = False,
    config: str | None = None,
    feature_history: str | None = None,
) -> BackfillSummary:
    """Score every date from ``start`` to ``end``; committed dates are skipped unless ``force``.

    The alias is resolved once: every date is scored by the same version. All inputs are
    checked before the first date runs. ``input_path`` may contain ``{date}``.
    """
    settings = load_settings(config)
    configure(settings)
    logger = get_run_logger()
    dates = date_range(parse_date(start, "--from"), parse_date(end, "--to"))
    to_run, skipped = dates_to_score(dates, committed_dates(str(settings.home_path)), force)
    if skipped:
        logger.info("skipping %d committed dates (use force to rescore them)", len(skipped))
    missing = [(d, input_for(input_path, settings.data_dir, d)) for d in to_run]
    missing = [(d, p) for d, p in missing if not p.exists()]
    if missing:
        d, p = missing[0]
        more = f" (and {len(missing) - 1} more dates)" if len(missing) > 1 else ""
        raise DataError(missing_input_message(p, d) + more)
    scored = []
    if to_run:
        version = pin_model(settings, alias).ref.version
        for d in to_run:
            scored.append(
                score_flow(
                    run_date=d.isoformat(),
                    input_path=input_path,
                    alias=alias,
                    compare=compare,
                    version=version,
                    config=config,
                    feature_history=feature_history,
                )
            )
    return BackfillSummary(tuple(scored), tuple(skipped))
