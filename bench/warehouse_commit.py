"""Warehouse commit benchmark: the score store's publish-by-rename against an in-place write.

    .venv/bin/python bench/warehouse_commit.py --dates 365 --trials 40

A commit changes ``warehouse.duckdb`` in a private copy (copy, one transaction, checkpoint,
close, fsync, rename; ``adapters.storage``) so that a process killed mid-write cannot leave
the file unreadable. This measures what that costs, in one run on the same warehouse:

  (a) baseline: the same transaction (replace the date's ``score_runs`` row, recreate the
      ``scores`` view over every committed part) on the file opened read-write in place,
      closed (DuckDB checkpoints on close) and fsynced, which is what a plain DuckDB
      writer does;
  (b) the store's warehouse step: ``_writer`` + the same transaction + ``publish``.

The warehouse first gets ``--dates`` committed run dates of four parts each (a year of
nightly runs by default). Trials alternate (a) and (b), so drift in machine load hits both;
the script prints the median and p90 milliseconds of each and the ratio b/a of the medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import duckdb  # noqa: E402
import pyarrow as pa  # noqa: E402

from adapters import storage  # noqa: E402
from adapters.storage import _Layout, _published, _rebuild_view, _writer  # noqa: E402

FIRST_DAY = date(2025, 1, 1)


def _record(rows: int) -> storage.RunRecord:
    now = datetime.now(UTC)
    return storage.RunRecord("fraud", "1", "champion", None, rows, now, now, {"score": 1.0})


def _populate(root: Path, dates: int) -> None:
    table = pa.table({"transaction_id": pa.array(range(10), pa.int64()), "score": [0.5] * 10})
    for d in range(dates):
        day = FIRST_DAY + timedelta(days=d)
        stage = storage.StagedRun.open(root, day, f"run-{d}")
        infos = [stage.write_part(i, table) for i in range(4)]
        stage.commit(infos, _record(40))


def _transaction(con: duckdb.DuckDBPyConnection, layout: _Layout, day: date, trial: int) -> None:
    run_id, parts = _published(con)[day]
    now = datetime.now(UTC)
    con.execute("BEGIN TRANSACTION")
    con.execute("DELETE FROM score_runs WHERE run_date = ?", [day])
    con.execute(
        "INSERT INTO score_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?::JSON, ?)",
        [day, run_id, "fraud", str(trial), "champion", None, 40, 40, parts, 1, now, now, "{}", now],
    )
    _rebuild_view(con, layout)
    con.execute("COMMIT")


def _in_place(layout: _Layout, day: date, trial: int) -> None:
    con = duckdb.connect(str(layout.warehouse))
    try:
        _transaction(con, layout, day, trial)
    finally:
        con.close()
    fd = os.open(layout.warehouse, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _published_by_rename(layout: _Layout, day: date, trial: int) -> None:
    with _writer(layout, storage.DEFAULT_LOCK_TIMEOUT) as work:
        _transaction(work.con, layout, day, trial)
        work.publish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dates", type=int, default=365, help="Committed run dates first.")
    parser.add_argument("--trials", type=int, default=40, help="Commits of each kind.")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-warehouse-"))
    try:
        t0 = time.perf_counter()
        _populate(root, args.dates)
        layout = _Layout.of(root)
        size = layout.warehouse.stat().st_size
        print(
            f"warehouse: {args.dates} dates, {size / 1e6:.2f} MB (built in {time.perf_counter() - t0:.1f} s)"
        )
        timings: dict[str, list[float]] = {"a_in_place": [], "b_store": []}
        for trial in range(args.trials):
            day = FIRST_DAY + timedelta(days=trial % args.dates)
            for name, step in (("a_in_place", _in_place), ("b_store", _published_by_rename)):
                start = time.perf_counter()
                step(layout, day, trial)
                timings[name].append((time.perf_counter() - start) * 1000)
        for name, ms in timings.items():
            p90 = statistics.quantiles(ms, n=10)[-1]
            print(f"{name:11s} median {statistics.median(ms):7.2f} ms   p90 {p90:7.2f} ms")
        ratio = statistics.median(timings["b_store"]) / statistics.median(timings["a_in_place"])
        print(f"b/a (median) = {ratio:.2f}")
        dates = storage.committed_dates(root)
        assert len(dates) == args.dates, f"{len(dates)} dates after the trials"
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
