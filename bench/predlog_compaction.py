"""Prediction-log compaction benchmark: a rollout window's read before and after compacting.

    .venv/bin/python bench/predlog_compaction.py --files 3000 --rows 20 --trials 9

Builds a log with a closed day of ``--files`` flush files (one every 2 s, as the service
writes) and today's recent files, then times, before and after ``compact_day`` of the
closed day: (w) a rollout tick's read of the last 10 minutes (today's files only),
(x) a window reaching one hour back into the closed day, and (a) a read of the whole log.
Prints medians and the after/before ratios; (w) should be the same (ratio about 1).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The script's own folder holds bench/serving.py, which would shadow the serving package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from mlops.datagen import fraud_schema  # noqa: E402
from mlops.predlog import log_schema, part_name  # noqa: E402
from serving.predlog_store import PredictionLogStore, compact_day  # noqa: E402


def _write(root: Path, committed: datetime, seq: int, rows: int) -> None:
    fields = [f.with_nullable(True) for f in log_schema(fraud_schema())]
    folder = root / f"date={committed.date().isoformat()}"
    folder.mkdir(parents=True, exist_ok=True)
    given = {
        "request_id": pa.array([f"r{seq}-{i}" for i in range(rows)]),
        "ts": pa.array(
            [committed - timedelta(milliseconds=i) for i in range(rows)], pa.timestamp("us", tz="UTC")
        ),
        "role": pa.array(["primary"] * rows),
        "score": pa.array([0.5] * rows),
    }
    arrays = [given.get(f.name, pa.nulls(rows, f.type)) for f in fields]
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    pq.write_table(table, folder / part_name(committed, 1, seq), compression="zstd")


def _time(fn: Callable[[], object], trials: int) -> float:
    out = []
    for _ in range(trials):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return statistics.median(out)


def main() -> None:
    """Build the log, time the reads before and after compaction, print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=3000, help="Flush files of the closed day.")
    parser.add_argument("--rows", type=int, default=20, help="Rows per flush file.")
    parser.add_argument("--trials", type=int, default=9)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-predlog-"))
    try:
        root = home / "predictions"
        now = datetime.now(UTC).replace(microsecond=0)
        closed_end = datetime.combine(now.date(), datetime.min.time(), UTC) - timedelta(seconds=1)
        for i in range(args.files):
            _write(root, closed_end - timedelta(seconds=2 * i), i, args.rows)
        for i in range(300):  # today's last 10 minutes
            _write(root, now - timedelta(seconds=2 * i), args.files + i, args.rows)
        store = PredictionLogStore(root, home / "feedback", fraud_schema())
        reads = {
            "w: last 10 min": lambda: store.read_log(since=now - timedelta(minutes=10)),
            "x: into closed day": lambda: store.read_log(since=closed_end - timedelta(hours=1)),
            "a: whole log": lambda: store.query("SELECT count(*) FROM predictions"),
        }
        before = {name: _time(fn, args.trials) for name, fn in reads.items()}
        counts = {name: len(fn()) for name, fn in reads.items()}
        start = time.perf_counter()
        report = compact_day(root, closed_end.date().isoformat())
        print(
            f"compaction: {report.merged_files} files -> {len(report.into)} in {time.perf_counter() - start:.1f} s"
        )
        after = {name: _time(fn, args.trials) for name, fn in reads.items()}
        assert counts == {name: len(fn()) for name, fn in reads.items()}, "rows changed"
        for name in reads:
            print(
                f"{name:20s} before {before[name]:8.1f} ms   after {after[name]:8.1f} ms   ratio {after[name] / before[name]:.2f}"
            )
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
