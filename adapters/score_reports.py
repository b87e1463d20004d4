"""Champion/challenger agreement reports in the warehouse, beside ``score_runs``.

Two tables, one report per run date (a new replay of a date replaces its report, like
``score_runs``): ``score_comparisons`` (one row: which versions, correlation, decision
agreement, PSI, KS, means and decision rates) and ``score_comparison_segments`` (one row per
segment value). Written in one transaction under the warehouse's write lock, the lock the
score store commits under (``adapters.storage``), so a reader sees a whole report or the
previous one.
"""

from __future__ import annotations

import os
from datetime import UTC, date, datetime

import duckdb

from adapters import storage
from mlops.scoring import ModelRef
from mlops.stats import AgreementReport

_DDL = (
    """
    CREATE TABLE IF NOT EXISTS score_comparisons (
        run_date          DATE PRIMARY KEY,
        run_id            VARCHAR NOT NULL,
        model_name        VARCHAR NOT NULL,
        reference_alias   VARCHAR,
        reference_version INTEGER NOT NULL,
        compared_alias    VARCHAR,
        compared_version  INTEGER NOT NULL,
        rows              BIGINT NOT NULL,
        correlation       DOUBLE,
        decision_agreement DOUBLE NOT NULL,
        psi               DOUBLE NOT NULL,
        ks                DOUBLE NOT NULL,
        mean_reference    DOUBLE NOT NULL,
        mean_compared     DOUBLE NOT NULL,
        decision_rate_reference DOUBLE NOT NULL,
        decision_rate_compared  DOUBLE NOT NULL,
        threshold_reference DOUBLE NOT NULL,
        threshold_compared  DOUBLE NOT NULL,
        created_at        TIMESTAMPTZ NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS score_comparison_segments (
        run_date        DATE NOT NULL,
        segment_column  VARCHAR NOT NULL,
        segment_value   VARCHAR NOT NULL,
        rows            BIGINT NOT NULL,
        mean_reference  DOUBLE NOT NULL,
        mean_compared   DOUBLE NOT NULL,
        mean_diff       DOUBLE NOT NULL,
        decision_rate_reference DOUBLE NOT NULL,
        decision_rate_compared  DOUBLE NOT NULL,
        agreement       DOUBLE NOT NULL,
        PRIMARY KEY (run_date, segment_column, segment_value)
    )
    """,
)


def _nan_to_none(x: float) -> float | None:
    return None if x != x else x  # NaN: a constant side has no correlation


def write_comparison(
    root: str | os.PathLike[str],
    run_date: date,
    run_id: str,
    reference: ModelRef,
    compared: ModelRef,
    report: AgreementReport,
    *,
    lock_timeout: float = storage.DEFAULT_LOCK_TIMEOUT,
) -> None:
    """Replace the agreement report of ``run_date`` with ``report``, atomically."""
    # The score store's own write lock: these tables live in its warehouse file.
    with storage.writer(root, lock_timeout) as work:
        con = work.con
        for ddl in _DDL:
            con.execute(ddl)
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("DELETE FROM score_comparisons WHERE run_date = ?", [run_date])
            con.execute("DELETE FROM score_comparison_segments WHERE run_date = ?", [run_date])
            con.execute(
                "INSERT INTO score_comparisons VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    run_date,
                    run_id,
                    reference.name,
                    reference.alias,
                    reference.version,
                    compared.alias,
                    compared.version,
                    report.rows,
                    _nan_to_none(report.correlation),
                    report.decision_agreement,
                    report.psi,
                    report.ks,
                    report.mean_a,
                    report.mean_b,
                    report.decision_rate_a,
                    report.decision_rate_b,
                    reference.threshold,
                    compared.threshold,
                    datetime.now(UTC),
                ],
            )
            if report.segments:
                con.executemany(
                    "INSERT INTO score_comparison_segments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        [
                            run_date,
                            s.column,
                            s.value,
                            s.rows,
                            s.mean_a,
                            s.mean_b,
                            s.mean_diff,
                            s.decision_rate_a,
                            s.decision_rate_b,
                            s.agreement,
                        ]
                        for s in report.segments
                    ],
                )
            con.execute("COMMIT")
        except BaseException:
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass  # the failed statement already ended the transaction
            raise
