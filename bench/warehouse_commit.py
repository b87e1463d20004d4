"""Warehouse commit benchmark: does a commit (and a sweep, and a one-date query) slow down as history grows?

    .venv/bin/python bench/warehouse_commit.py --small 10 --large 1000 --trials 15

Builds two score stores, one with ``--small`` committed run dates and one with ``--large``
(four small parts each), then times, alternating between the two so drift in machine
load hits both: a whole re-commit of one date (open, write four parts, commit), a
``sweep``, a query of one date through ``scores_on(d)`` and the same count through
``scores``. Prints the median milliseconds of each and the ratio large/small; the goal for
commit is a ratio <= 1.5 at 10 vs 1,000 dates.

``--mixed`` replaces the last date of each store by a run with two extra columns, so the
store holds two schemas and its views read with ``union_by_name`` (every footer is read to
bind); it prints what that one commit took, and the timed commits stay of the common schema.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pyarrow as pa  # noqa: E402

from adapters import storage  # noqa: E402

FIRST_DAY = date(2023, 1, 1)
TABLE = pa.table({"transaction_id": pa.array(range(10), pa.int64()), "score": [0.5] * 10})
WIDE = TABLE.append_column("amount_sum_7d", pa.array([1.0] * 10)).append_column(
    "txn_count_7d", pa.array([2] * 10, pa.int64())
)


def _record(rows: int) -> storage.RunRecord:
    now = datetime.now(UTC)
    return storage.RunRecord("fraud", "1", "champion", None, rows, now, now, {"score": 1.0})


def _commit(root: Path, day: date, table: pa.Table = TABLE) -> None:
    stage = storage.StagedRun.open(root, day, storage.new_run_id())
    infos = [stage.write_part(i, table) for i in range(4)]
    stage.commit(infos, _record(40))


def _populate(root: Path, dates: int) -> None:
    """Commit one date through the store, copy its run folder to ``dates - 1`` more dates
    (manifest edited to match) and let ``storage.rebuild`` restore the warehouse from the
    folders: a history of ``dates`` committed runs in seconds rather than a commit each."""
    _commit(root, FIRST_DAY)
    layout = storage.ScoreLayout.of(root)
    (source,) = layout.date_dir(FIRST_DAY).iterdir()
    manifest = storage.read_manifest(source)
    assert manifest is not None
    for d in range(1, dates):
        day = FIRST_DAY + timedelta(days=d)
        run_dir = layout.run_dir(day, f"run-{d}")
        shutil.copytree(source, run_dir)
        manifest.update(run_date=day.isoformat(), run_id=run_dir.name)
        (run_dir / storage.MANIFEST).write_text(json.dumps(manifest))
    restored = storage.rebuild(root)
    assert len(restored) == dates, f"{len(restored)} dates restored"


def main() -> None:
    """Build both stores, time the operations alternately and print medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=10, help="Committed run dates of the small store.")
    parser.add_argument("--large", type=int, default=1000, help="Committed run dates of the large store.")
    parser.add_argument("--trials", type=int, default=15, help="Timings of each operation per store.")
    parser.add_argument(
        "--mixed", action="store_true", help="Give each store's last date two extra columns (two schemas)."
    )
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="bench-warehouse-"))
    try:
        stores = {"small": base / "small", "large": base / "large"}
        sizes = {"small": args.small, "large": args.large}
        for name, root in stores.items():
            t0 = time.perf_counter()
            _populate(root, sizes[name])
            print(f"{name}: {sizes[name]} dates built in {time.perf_counter() - t0:.1f} s")
            if args.mixed:
                t0 = time.perf_counter()
                _commit(root, FIRST_DAY + timedelta(days=sizes[name] - 1), WIDE)
                print(
                    f"{name}: the commit adding a second schema took {(time.perf_counter() - t0) * 1000:.0f} ms"
                )
        day = FIRST_DAY + timedelta(days=3)
        ops: dict[str, Callable[[Path], object]] = {
            "commit": lambda root: _commit(root, day),
            "sweep": storage.sweep,
            "query scores_on(d)": lambda root: storage.query(
                root, "SELECT count(*) FROM scores_on(?)", [day]
            ),
            "query scores where d": lambda root: storage.query(
                root, "SELECT count(*) FROM scores WHERE run_date = ?", [day]
            ),
        }
        timings = {(op, name): [] for op in ops for name in stores}
        for _ in range(args.trials):
            for op, fn in ops.items():
                for name, root in stores.items():
                    start = time.perf_counter()
                    fn(root)
                    timings[(op, name)].append((time.perf_counter() - start) * 1000)
        for op in ops:
            small = statistics.median(timings[(op, "small")])
            large = statistics.median(timings[(op, "large")])
            print(
                f"{op:22s} {args.small:5d} dates {small:7.2f} ms   {args.large:5d} dates {large:7.2f} ms"
                f"   ratio {large / small:.2f}"
            )
        for name, root in stores.items():
            assert len(storage.committed_dates(root)) == sizes[name]
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
