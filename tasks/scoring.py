"""Batch scoring tasks: pin models, plan the input, score partitions on Dask, commit.

Two halves. ``score_partition`` runs on the Dask workers: it reads its own rows, validates
them against the schema's suite (vectorised Arrow checks; Great Expectations reports a
partition that fails), scores them with an ONNX Runtime session that the
worker builds once per model version and keeps (``worker_scorer``), writes one staged
Parquet part and returns a small ``PartitionResult``. The Prefect tasks run on the driver
and wrap one adapter call each; retries sit only on the IO that can be retried.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import date

from prefect import get_run_logger, task

from adapters import parquet_input, storage
from adapters.dask_cluster import ClusterError, client_for, host_task_threads
from adapters.storage import CommitInfo, PartInfo, RunRecord, StagedRun
from mlops.features import FeatureSet, batch_features, model_view
from mlops.onnx_model import CodedScorer
from mlops.partitions import Partition, plan_partitions
from mlops.scoring import SCORE, ModelRef, column_arrays, decision_threshold, score_table, session_threads
from mlops.settings import DatasetSchema, Settings
from mlops.stats import AgreementStats, agreement_stats

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- worker side

SCORER_CACHE_SIZE = 4
_scorers: OrderedDict[tuple[str, int, str, int], CodedScorer] = OrderedDict()
_loads: Counter[str] = Counter()
_scorers_lock = threading.Lock()


def worker_scorer(model: ModelRef, onnx: bytes, schema: DatasetSchema, threads: int) -> CodedScorer:
    """This process's ONNX Runtime session for ``model``, built on first use and kept.

    Keyed by name, version and content digest (two homes may both have a ``v1``), and
    bounded: a long-lived worker keeps the few most recent versions only. The scorer
    feeds categorical features as integer codes when the graph allows (``CodedScorer``).
    """
    key = (model.name, model.version, model.digest, threads)
    with _scorers_lock:
        scorer = _scorers.get(key)
        if scorer is not None:
            _scorers.move_to_end(key)
            return scorer
        scorer = CodedScorer(onnx, schema, threads=threads)
        _scorers[key] = scorer
        _loads[model.digest] += 1
        while len(_scorers) > SCORER_CACHE_SIZE:
            _scorers.popitem(last=False)
        return scorer


def scorer_loads() -> dict[str, int]:
    """How many sessions this process has built, per model digest (for checks and tests)."""
    with _scorers_lock:
        return dict(_loads)


@dataclass(frozen=True)
class PartitionJob:
    """Everything a worker needs to score one partition (small, pickled to the worker)."""

    partition: Partition
    columns: tuple[str, ...]
    schema: DatasetSchema
    root: str
    run_date: date
    run_id: str
    models: tuple[ModelRef, ...]
    ort_threads: int
    flow_run_id: str | None
    segments: tuple[str, ...] = ()
    model_schemas: tuple[DatasetSchema, ...] = ()  # per model, when it takes window features
    windows: tuple[str, ...] = ()  # window feature columns, written with the scores


@dataclass(frozen=True)
class PartitionResult:
    """What a worker sends back: the part it staged, or the expectations its rows failed."""

    index: int
    rows: int
    part: PartInfo | None
    failures: tuple[str, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)
    agreement: AgreementStats | None = None
    skipped: bool = False  # validated only: another partition had failed


def _stop_event_name(run_id: str) -> str:
    return f"mlops-score-stop-{run_id}"


def _stop_requested(run_id: str) -> bool:
    """Whether the driver asked this run's partitions to validate only (one had failed)."""
    from distributed import Event
    from distributed.worker import get_worker

    try:
        get_worker()
    except ValueError:  # called outside a Dask worker: nobody can ask to stop
        return False
    return Event(_stop_event_name(run_id)).is_set()


def score_partition(job: PartitionJob, models: Sequence[bytes]) -> PartitionResult:
    """Read, validate, score and stage one partition (runs on a Dask worker).

    Nothing is staged when the rows fail validation. With two models, the second scores
    the same feeds and only a constant-size ``AgreementStats`` comes back for it.
    """
    from adapters.validation import validate_table

    clock, cpu = time.perf_counter(), time.thread_time()
    seconds: dict[str, float] = {}

    def lap(name: str) -> None:  # wall and CPU seconds of this worker thread per phase
        nonlocal clock, cpu
        now, now_cpu = time.perf_counter(), time.thread_time()
        seconds[name], seconds[f"{name}_cpu"] = now - clock, now_cpu - cpu
        clock, cpu = now, now_cpu

    part = job.partition
    table = parquet_input.read_partition(part, job.columns, dictionary=job.schema.categorical_names)
    lap("read")
    # Arrow checks decide a pass; only a failing partition becomes a pandas frame for GX.
    summary = validate_table(table, job.schema, require_label=False, source=part.describe())
    lap("validate")
    if not summary.success:
        return PartitionResult(part.index, table.num_rows, None, summary.failures, seconds)
    if _stop_requested(job.run_id):
        return PartitionResult(part.index, table.num_rows, None, (), seconds, skipped=True)

    schemas = job.model_schemas or (job.schema,) * len(job.models)
    primary = worker_scorer(job.models[0], models[0], schemas[0], job.ort_threads)
    feeds = primary.table_feeds(table)
    scores = primary.run_table(feeds)
    agreement = None
    if len(job.models) > 1:
        second = worker_scorer(job.models[1], models[1], schemas[1], job.ort_threads)
        same = schemas[1] == schemas[0] and second.categories == primary.categories
        other = second.run_table(feeds if same else second.table_feeds(table))
        segments = column_arrays(table, job.segments)
        agreement = agreement_stats(scores, other, job.models[0].threshold, job.models[1].threshold, segments)
    del feeds
    lap("score")
    kept = [c for c in job.schema.key_columns + job.windows if c in table.column_names]
    keys = table.select(kept)
    out = score_table(keys, scores, job.models[0], job.flow_run_id)
    # Ids, event times and scores are (nearly) all distinct: a dictionary would be built and
    # abandoned for them. Snappy stays: uncompressed parts write 0.03 us/row faster but are
    # twice the size and slower for DuckDB to scan (docs/design/score-store.md).
    distinct = [c for c in (job.schema.id_column, job.schema.timestamp_column, SCORE) if c]
    info = storage.write_part(job.root, job.run_date, job.run_id, part.index, out, distinct_columns=distinct)
    lap("write")
    return PartitionResult(part.index, table.num_rows, info, (), seconds, agreement)


# --------------------------------------------------------------------------- driver side


@dataclass(frozen=True)
class PinnedModel:
    """A model version resolved once for a whole run, with its ONNX bytes."""

    ref: ModelRef
    onnx: bytes = field(repr=False)


@task(name="pin-model", retries=2, retry_delay_seconds=[2, 10])
def pin_model(settings: Settings, alias: str, version: int | None = None) -> PinnedModel:
    """Resolve ``alias`` to one version (unless ``version`` pins it already) and fetch its ONNX file."""
    from registry.mlflow_registry import ModelRegistry

    registry = ModelRegistry(settings)
    name = settings.training.model_name
    info = registry.version(name, version) if version is not None else registry.resolve(name, alias)
    onnx = registry.onnx_bytes(name, info.version)
    threshold = decision_threshold(
        settings.scoring.decision_threshold, info.tags, settings.training.decision_threshold
    )
    digest = hashlib.sha256(onnx).hexdigest()[:16]
    ref = ModelRef(name, info.version, alias, threshold, digest, model_view(info.tags))
    return PinnedModel(ref, onnx)


@task(name="committed-dates", retries=2, retry_delay_seconds=[2, 10])
def committed_dates(root: str) -> list[date]:
    """The run dates the score store has a committed run for."""
    return storage.committed_dates(root)


@task(name="prepare-input")
def prepare_input(path: str, workdir: str, rows_per_partition: int, schema: DatasetSchema) -> str:
    """The Parquet input to plan: ``path`` itself, or Parquet copies of its CSV files in ``workdir``."""
    return str(parquet_input.parquet_input(path, workdir, rows_per_partition, schema))


def remove_workdir(workdir: str) -> None:
    """Remove a run's input work folder (CSV copies), whatever the run's outcome."""
    shutil.rmtree(workdir, ignore_errors=True)


@task(name="window-features")
def add_window_features(
    path: str,
    workdir: str,
    views: Sequence[FeatureSet],
    schema: DatasetSchema,
    history: str | None,
    rows_per_group: int,
) -> str:
    """The input with the window features of ``views`` appended, as one Parquet file in
    ``workdir``: computed from the input's own events and ``history``'s earlier ones."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from adapters.datasets import read_table

    rows = read_table(path, schema=schema)
    past = None
    if history:
        fs = views[0]
        cols = dict.fromkeys(
            (fs.entity_column, fs.timestamp_column, *(c for v in views for c in v.source_columns))
        )
        past = read_table(history, list(cols), schema)
    table = batch_features(views, rows, past)
    out = Path(workdir) / "_windows" / "input.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    pq.write_table(table, tmp, row_group_size=rows_per_group, compression="zstd")
    tmp.replace(out)  # the partitions never see a half-written input
    return str(out)


@task(name="plan-partitions")
def plan_input(path: str, rows_per_partition: int, min_rows: int) -> tuple[Partition, ...]:
    """Partitions of the input, from its Parquet footers (no data is read here)."""
    return plan_partitions(parquet_input.layouts(path), rows_per_partition, min_rows=min_rows)


@task(name="open-staging", retries=2, retry_delay_seconds=[2, 10])
def open_staging(root: str, run_date: date, run_id: str) -> StagedRun:
    """Repair the store, remove abandoned staging runs (killed earlier runs), and open the
    staging folder of this run."""
    storage.sweep(root)
    return StagedRun.open(root, run_date, run_id)


@task(name="abort-staging")
def abort_staging(staged: StagedRun) -> None:
    """Drop the staging run; the date's published run stays as it is."""
    staged.abort()


# Not retried as a whole: Dask retries a failed partition, and reschedules the partitions
# of a worker that died.
@task(name="score-partitions")
def score_partitions(
    settings: Settings, jobs: Sequence[PartitionJob], models: Sequence[PinnedModel]
) -> list[PartitionResult]:
    """Run ``score_partition`` for every job on Dask and return the results by partition.

    The model files are broadcast to the workers once; results come back as partitions
    finish, so the driver holds only their small summaries. Once a partition fails
    validation the others are still validated, for a complete list of failures, but no
    longer scored or staged.
    """
    from distributed import Event, as_completed

    logger = get_run_logger()
    client = client_for(settings.dask)
    try:
        onnx = [client.scatter(m.onnx, broadcast=True) for m in models]
        threads = session_threads(settings.scoring.ort_threads, host_task_threads(client))
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"cannot send the model to the Dask workers or ask their cores: {exc}") from exc
    if jobs and threads != jobs[0].ort_threads:
        logger.info(
            "ONNX Runtime threads per session lowered from %d to %d: the workers' task threads fill the cores",
            jobs[0].ort_threads,
            threads,
        )
        jobs = [replace(j, ort_threads=threads) for j in jobs]
    stop = Event(_stop_event_name(jobs[0].run_id), client=client) if jobs else None
    futures = client.map(
        score_partition,
        list(jobs),
        models=onnx,
        pure=False,
        retries=1,
        key=[f"score-{j.run_id}-{j.partition.index:05d}" for j in jobs],
    )
    results: list[PartitionResult] = []
    rows = 0
    total = sum(j.partition.rows for j in jobs)
    failed = False
    try:
        for future in as_completed(futures, loop=client.loop):
            result: PartitionResult = future.result()
            results.append(result)
            if result.failures and not failed:
                failed = True
                stop.set()
                logger.warning(
                    "partition %d failed validation: the others are validated, not scored", result.index
                )
            rows += result.rows
            logger.info(
                "%s partition %d (%d of %d partitions, %s of %s rows)",
                "checked" if failed else "scored",
                result.index,
                len(results),
                len(jobs),
                f"{rows:,}",
                f"{total:,}",
            )
    finally:
        client.cancel(futures)
        if stop is not None:
            stop.clear()
    return sorted(results, key=lambda r: r.index)


@task(name="commit-scores", retries=2, retry_delay_seconds=[2, 10])
def commit_run(staged: StagedRun, parts: Sequence[PartInfo], record: RunRecord) -> CommitInfo:
    """Publish the staged run as the run of its date (idempotent: a retry returns the same commit)."""
    return staged.commit(parts, record)


@task(name="record-comparison", retries=2, retry_delay_seconds=[2, 10])
def record_comparison(
    root: str, run_date: date, run_id: str, reference: ModelRef, compared: ModelRef, report
) -> None:
    """Store the champion/challenger agreement report of the run date in the warehouse."""
    from adapters.score_reports import write_comparison

    write_comparison(root, run_date, run_id, reference, compared, report)
