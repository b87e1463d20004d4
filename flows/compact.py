"""Prediction-log compaction: merge each closed day's flush files into a few.

The serving writer commits a file per day partition at every flush (about 43,000 a day at a
2 s flush); readers, rollout ticks included, pay for every file they open. Once a day has
closed, ``compact_flow`` merges its files (``serving.predlog_store.compact_day``: atomic for
readers, safe to kill and re-run) in the prediction log and in the feedback log.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prefect import flow, get_run_logger, task

from adapters.runtime import configure
from mlops.predlog import closed_days
from mlops.settings import load_settings
from serving.predlog_store import CompactionReport, compact_day, feedback_dir, log_days, predictions_dir


@task(name="compact-log-day", retries=2, retry_delay_seconds=[5, 30])
def compact_log_day(root: str, day: str) -> CompactionReport:
    """Compact one closed day folder of a log (a no-op for a day compacted already)."""
    return compact_day(root, day)


@flow(name="compact-prediction-log")
def compact_flow(grace_minutes: int = 30, config: str | None = None) -> list[CompactionReport]:
    """Compact every closed day of the prediction log and the feedback log.

    Args:
        grace_minutes: A day counts as closed this long after its UTC midnight.
        config: Platform config YAML (default: $MLOPS_CONFIG, else built-in defaults).
    """
    logger = get_run_logger()
    settings = load_settings(config)
    configure(settings)
    now = datetime.now(UTC)
    reports = []
    for root in (predictions_dir(settings), feedback_dir(settings)):
        for day in closed_days(log_days(root), now, timedelta(minutes=grace_minutes)):
            report = compact_log_day(str(root), day)
            if report.merged_files:
                logger.info(
                    "%s %s: %d files merged into %d", root.name, day, report.merged_files, len(report.into)
                )
            reports.append(report)
    return reports
