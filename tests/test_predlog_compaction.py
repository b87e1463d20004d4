"""Compaction of the prediction log: a closed day's many flush files become a few, atomically.

Real Parquet files in ``tmp_path`` and the real reader (``PredictionLogStore``); the kill
test runs the compaction in a child process from a forkserver and SIGKILLs it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlops.datagen import fraud_schema
from mlops.predlog import COMPACTION_JOURNAL, closed_days, log_schema, part_name
from serving.predlog_store import PredictionLogStore, compact_day

pytestmark = pytest.mark.integration

DAY = "2026-12-01"
START = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def write_part(root: Path, index: int, rows: int = 20, extra: bool = False) -> None:
    """One flush file of the writer's shape, committed ``index`` seconds after START; rows
    ``index*1000 ..``; with ``extra`` a column only later files have (``annotation``)."""
    folder = root / "predictions" / f"date={DAY}"
    folder.mkdir(parents=True, exist_ok=True)
    committed = START + timedelta(seconds=index)
    ts = [committed - timedelta(milliseconds=rows - i) for i in range(rows)]
    columns = {
        "request_id": pa.array([f"r{index * 1000 + i}" for i in range(rows)], pa.string()),
        "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
        "role": pa.array(["primary"] * rows, pa.string()),
        "score": pa.array([i / rows for i in range(rows)], pa.float64()),
    }
    fields = [f.with_nullable(True) for f in log_schema(fraud_schema())]
    if extra:
        columns["annotation"] = pa.array([f"a{i}" for i in range(rows)], pa.string())
        fields.append(pa.field("annotation", pa.string()))
    arrays = [columns.get(f.name, pa.nulls(rows, f.type)) for f in fields]
    pq.write_table(
        pa.Table.from_arrays(arrays, schema=pa.schema(fields)), folder / part_name(committed, 4242, index)
    )


def store(root: Path) -> PredictionLogStore:
    return PredictionLogStore(root / "predictions", root / "feedback", fraud_schema())


def request_ids(root: Path) -> list[str]:
    return sorted(store(root).query("SELECT request_id FROM predictions")["request_id"].tolist())


def expected_ids(parts: range, rows: int = 20) -> list[str]:
    return sorted(f"r{p * 1000 + i}" for p in parts for i in range(rows))


def test_a_compacted_day_has_few_files_every_row_once_and_every_column(tmp_path: Path) -> None:
    """Given 120 flush files, some with a column the others lack, compaction leaves one
    merged file per ``rows_per_file`` rows, the same rows (none lost, none twice), the extra
    column carried through (null where a file lacked it), and a rollout window read returns
    the same rows from no more files than before."""
    for i in range(120):
        write_part(tmp_path, i, extra=i >= 100)
    before = store(tmp_path).query("SELECT * EXCLUDE (date) FROM predictions ORDER BY request_id")
    window = START + timedelta(seconds=110)
    window_before = store(tmp_path).read_log(since=window)
    report = compact_day(tmp_path / "predictions", DAY, rows_per_file=1_000)
    folder = tmp_path / "predictions" / f"date={DAY}"
    assert report.merged_files == 120 and report.rows == 2_400 and len(report.into) == 3
    assert sorted(p.name for p in folder.glob("*.parquet")) == sorted(report.into)
    after = store(tmp_path).query("SELECT * EXCLUDE (date) FROM predictions ORDER BY request_id")
    assert after.equals(before)
    assert after["annotation"].notna().sum() == 20 * 20
    assert store(tmp_path).read_log(since=window).equals(window_before)
    # Compacting again changes nothing; a late file is merged with the rest next time.
    assert compact_day(tmp_path / "predictions", DAY).merged_files == 0
    write_part(tmp_path, 500)
    assert sorted(request_ids(tmp_path)) == sorted(expected_ids(range(120)) + expected_ids(range(500, 501)))
    again = compact_day(tmp_path / "predictions", DAY)
    assert again.merged_files == 4 and len(list(folder.glob("*.parquet"))) == 1
    assert sorted(request_ids(tmp_path)) == sorted(expected_ids(range(120)) + expected_ids(range(500, 501)))


_COMPACTOR = """
import os
import signal

from serving.predlog_store import compact_day

# Fault injection: with kill_at > 0 the process SIGKILLs itself just before its
# kill_at-th rename or delete, so every step of the protocol gets interrupted.
ops = [0]


def counted(fn):
    def step(*args, **kwargs):
        ops[0] += 1
        if ops[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)

    return step


os.replace, os.unlink = counted(os.replace), counted(os.unlink)
started.set()
compact_day(root, day, rows_per_file=rows_per_file)
done.set()
"""


def test_a_compaction_killed_at_any_point_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """Given a day that keeps receiving late files, when compactions of it are SIGKILLed
    again and again (before a random one of their renames and deletes, or after a random
    time while a reader polls), then after every kill and while they run a reader sees every
    row exactly once, and the next compaction finishes the job."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["serving.predlog_store", "pyarrow.parquet", "duckdb", "pandas"])
    root = tmp_path / "predictions"
    rng = random.Random(20261201)
    written = 0
    killed_mid_way = 0
    for round_ in range(16):
        for _ in range(10):  # late files since the last compaction
            write_part(tmp_path, written)
            written += 1
        kill_at = rng.randint(1, 20) if round_ % 4 else 0
        started, done = ctx.Event(), ctx.Event()
        names = {
            "root": str(root),
            "day": DAY,
            "rows_per_file": 1_000,
            "kill_at": kill_at,
            "started": started,
            "done": done,
        }
        child = ctx.Process(target=exec, args=(_COMPACTOR, names), daemon=True)
        child.start()
        assert started.wait(30), "the compactor never started"
        if kill_at:
            child.join(60)
        else:
            deadline = time.monotonic() + rng.uniform(0, 0.6)
            while time.monotonic() < deadline:  # a reader at work during the compaction
                assert request_ids(tmp_path) == expected_ids(range(written))
            with contextlib.suppress(ProcessLookupError):  # it may have finished (and been reaped)
                os.kill(child.pid, signal.SIGKILL)
            child.join(10)
        # Killed (by itself or by us), or finished: never crashed.
        assert done.is_set() or child.exitcode == -signal.SIGKILL, f"compactor exit code {child.exitcode}"
        if not done.is_set():
            killed_mid_way += 1
        assert request_ids(tmp_path) == expected_ids(range(written)), f"round {round_}, kill_at {kill_at}"
    assert killed_mid_way >= 8, killed_mid_way
    report = compact_day(root, DAY, rows_per_file=1_000)
    folder = root / f"date={DAY}"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([*report.into, COMPACTION_JOURNAL])
    assert request_ids(tmp_path) == expected_ids(range(written))


def test_only_days_that_ended_a_grace_period_ago_count_as_closed() -> None:
    """Just after midnight yesterday is still open (a last flush may land); later it closes.
    Names that are not days are ignored."""
    days = ["2026-12-04", "2026-12-05", "2026-12-06", "junk"]
    grace = timedelta(minutes=30)
    assert closed_days(days, datetime(2026, 12, 6, 0, 10, tzinfo=UTC), grace) == ["2026-12-04"]
    assert closed_days(days, datetime(2026, 12, 6, 0, 40, tzinfo=UTC), grace) == ["2026-12-04", "2026-12-05"]
