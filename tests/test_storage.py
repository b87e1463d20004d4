"""The score store: staged Parquet parts, one atomic publish per run date, DuckDB readers.

Everything here runs against a real DuckDB file and real Parquet files in ``tmp_path``.
Tests that need a second process (a reader holding the lock, a scorer killed with SIGKILL)
fork it from a forkserver that has pyarrow, pandas and this adapter preloaded, so a child
starts in tens of milliseconds; the child runs a short script of its own.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from adapters import storage
from adapters.storage import (
    IncompleteRun,
    PartInfo,
    RunRecord,
    StagedRun,
    StagingMissing,
    WarehouseBusy,
)
from mlops.errors import DataError, PlatformError

pytestmark = pytest.mark.integration

DAY = date(2025, 3, 1)
OTHER_DAY = date(2025, 3, 2)


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture(scope="module")
def forkserver() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["adapters.storage", "pyarrow.parquet", "pandas", "duckdb"])
    return ctx


def record(**changes: object) -> RunRecord:
    now = datetime.now(UTC)
    fields: dict[str, object] = {
        "model_name": "fraud",
        "model_version": "7",
        "alias": "champion",
        "flow_run_id": "flow-1",
        "rows_in": 0,
        "started_at": now - timedelta(seconds=3),
        "finished_at": now,
        "phase_seconds": {"load": 0.5, "score": 2.0, "write": 0.25},
    }
    fields.update(changes)
    return RunRecord(**fields)  # type: ignore[arg-type]


def part_table(index: int, rows: int, tag: str = "x") -> pa.Table:
    ids = list(range(index * 1000, index * 1000 + rows))
    return pa.table(
        {
            "transaction_id": pa.array(ids, pa.int64()),
            "score": pa.array([(i % 97) / 97 for i in ids], pa.float64()),
            "tag": pa.array([tag] * rows, pa.string()),
        }
    )


def run_once(root: Path, day: date, parts: list[int], tag: str = "x") -> storage.CommitInfo:
    """A whole scoring run: sweep, stage ``parts`` (rows per part), commit."""
    storage.sweep(root)
    stage = StagedRun.open(root, day, storage.new_run_id())
    infos = [stage.write_part(i, part_table(i, rows, tag)) for i, rows in enumerate(parts)]
    return stage.commit(infos, record(rows_in=sum(parts)))


def count(root: Path, where: str = "true") -> int:
    return storage.query(root, f"SELECT count(*) AS n FROM scores WHERE {where}")["n"][0].as_py()


def spawn(
    forkserver: multiprocessing.context.BaseContext, script: str, **names: object
) -> multiprocessing.process.BaseProcess:
    """Start a child process that runs ``script`` with ``names`` as its globals."""
    child = forkserver.Process(target=exec, args=(script, names), daemon=True)
    child.start()
    return child


def wait_for(ready: Callable[[], bool], child: multiprocessing.process.BaseProcess) -> None:
    """Wait until ``ready()``; fail at once if ``child`` died, or after 30 seconds."""
    deadline = time.monotonic() + 30
    while not ready():
        assert child.is_alive(), f"the child process died (exit code {child.exitcode})"
        assert time.monotonic() < deadline, "the child process never got ready"
        time.sleep(0.0005)


def tree(path: Path) -> set[str]:
    """Every entry under ``path``, relative, symlinks marked with their target."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(path))
            out.add(f"{rel} -> {os.readlink(full)}" if full.is_symlink() else rel)
    return out


# --------------------------------------------------------------------------- publishing


def test_commit_makes_exactly_its_rows_visible(root: Path) -> None:
    """Given an empty store, when a run of three parts commits, then ``scores`` holds
    exactly its rows under its run_date and ``score_runs`` describes it."""
    assert storage.committed_dates(root) == []

    info = run_once(root, DAY, [100, 50, 0])

    assert info.rows_out == 150 and info.parts == 3
    assert count(root) == 150
    assert count(root, f"run_date = DATE '{DAY}'") == 150
    assert storage.committed_dates(root) == [DAY]
    (row,) = storage.query(root, "SELECT *, phase_seconds->>'score' AS score_s FROM score_runs").to_pylist()
    assert row["run_id"] == info.run_id
    assert (row["model_name"], row["model_version"], row["alias"]) == ("fraud", "7", "champion")
    assert (row["rows_in"], row["rows_out"], row["parts"]) == (150, 150, 3)
    assert row["score_s"] == "2.0"
    assert row["started_at"] < row["finished_at"] <= row["committed_at"]


def test_recommitting_a_date_replaces_it_and_never_duplicates(root: Path) -> None:
    """Given runs committed for two dates, when the first date is scored again, then it
    holds only the new run's rows, the other date is untouched, score_runs keeps one row
    per date, and the superseded run's files are gone."""
    first = run_once(root, DAY, [100, 100], tag="old")
    run_once(root, OTHER_DAY, [10])
    second = run_once(root, DAY, [70, 70, 70], tag="new")

    got = storage.query(
        root, "SELECT run_date, tag, count(*) AS n FROM scores GROUP BY ALL ORDER BY ALL"
    ).to_pylist()
    assert got == [
        {"run_date": DAY, "tag": "new", "n": 210},
        {"run_date": OTHER_DAY, "tag": "x", "n": 10},
    ]
    runs = storage.query(root, "SELECT run_date, run_id FROM score_runs ORDER BY 1").to_pylist()
    assert [r["run_date"] for r in runs] == [DAY, OTHER_DAY]
    assert runs[0]["run_id"] == second.run_id
    assert not Path(first.path).exists()
    assert os.readlink(root / "scores" / f"run_date={DAY}").endswith(second.run_id)


def test_the_hive_layout_reads_the_same_rows_through_the_pointers(root: Path) -> None:
    """Given committed runs, a Hive-style glob over ``scores/run_date=*/*.parquet`` follows
    the date pointers (symlinks) in DuckDB and reads exactly the rows of the view; the
    recursive ``**`` glob does not follow them, which is why nothing relies on it."""
    run_once(root, DAY, [30, 20])
    run_once(root, DAY, [40], tag="newer")
    run_once(root, OTHER_DAY, [5])
    glob = f"{root}/scores/run_date=*/*.parquet"

    through_pointers = storage.query(
        root,
        "SELECT run_date, tag, transaction_id, score FROM "
        f"read_parquet('{glob}', hive_partitioning = true, hive_types = {{'run_date': DATE}}) "
        "ORDER BY ALL",
    )
    view = storage.query(root, "SELECT run_date, tag, transaction_id, score FROM scores ORDER BY ALL")
    assert through_pointers.equals(view) and view.num_rows == 45
    recursive = storage.query(root, f"SELECT file FROM glob('{root}/scores/**/*.parquet')")
    assert all("/_runs/" in f for f in recursive["file"].to_pylist())


def test_committing_the_same_run_again_returns_the_first_commit(root: Path) -> None:
    """A commit retried after it succeeded (a task retry) changes nothing."""
    stage = StagedRun.open(root, DAY, "run-1")
    parts = [stage.write_part(0, part_table(0, 10))]
    first = stage.commit(parts, record())
    again = stage.commit(parts, record())
    assert (again.run_id, again.rows_out, again.parts) == (first.run_id, 10, 1)
    assert count(root) == 10
    with pytest.raises(PlatformError, match="already the committed run"):
        StagedRun.open(root, DAY, "run-1")


def test_rewriting_a_part_replaces_it(root: Path) -> None:
    """Writing the same index twice (a retried task) leaves one complete part: the last."""
    stage = StagedRun.open(root, DAY, "run-1")
    stage.write_part(0, part_table(0, 10))
    info = stage.write_part(0, part_table(0, 4, tag="retry"))
    assert info == PartInfo(0, info.path, 4, os.path.getsize(info.path))
    assert sorted(os.listdir(Path(info.path).parent)) == ["_stage.json", "part-00000.parquet"]
    stage.commit([info], record())
    got = storage.query(root, "SELECT tag, count(*) AS n FROM scores GROUP BY ALL")
    assert got.to_pylist() == [{"tag": "retry", "n": 4}]


def test_an_incomplete_run_is_refused_and_can_be_completed(root: Path) -> None:
    """Given a run whose part is missing and whose other part has the wrong row count,
    commit publishes nothing and names both; once the parts are right it commits."""
    run_once(root, DAY, [7], tag="old")
    stage = StagedRun.open(root, DAY, "run-2")
    parts = [stage.write_part(i, part_table(i, 10)) for i in range(3)]
    os.unlink(parts[2].path)
    wrong = [parts[0], PartInfo(1, parts[1].path, 11, parts[1].bytes), parts[2]]

    with pytest.raises(IncompleteRun) as raised:
        stage.commit(wrong, record())
    assert raised.value.problems == [
        "part-00001.parquet: 10 rows, expected 11",
        "part-00002.parquet: missing",
    ]
    assert storage.query(root, "SELECT DISTINCT tag FROM scores")["tag"].to_pylist() == ["old"]

    parts[2] = stage.write_part(2, part_table(2, 10))
    assert stage.commit(parts, record()).rows_out == 30
    assert count(root) == 30


def test_parts_must_not_carry_the_partition_column(root: Path) -> None:
    """run_date comes from the folder; a part with its own run_date column is refused."""
    stage = StagedRun.open(root, DAY, "run-1")
    with pytest.raises(DataError, match="run_date"):
        stage.write_part(0, part_table(0, 3).append_column("run_date", pa.array([DAY] * 3)))
    with pytest.raises(ValueError, match="run id"):
        StagedRun.open(root, DAY, "../escape")


# --------------------------------------------------------------------------- staging and sweep


def test_an_uncommitted_run_is_invisible_and_swept_by_the_next_run(root: Path) -> None:
    """Given a committed run and a later run that staged parts but never committed, readers
    see only the committed rows; the next run of that date sweeps the abandoned staging,
    and a worker of the abandoned run can no longer write into it."""
    run_once(root, DAY, [5])
    abandoned = StagedRun.open(root, DAY, "killed-run")
    abandoned.write_part(0, part_table(0, 1000))
    assert count(root) == 5
    assert storage.committed_dates(root) == [DAY]

    run_once(root, DAY, [6])

    assert count(root) == 6
    assert list((root / "scores" / "_staging").iterdir()) == []
    with pytest.raises(StagingMissing):
        abandoned.write_part(1, part_table(1, 1))


def test_an_aborted_run_leaves_the_published_run_alone(root: Path) -> None:
    """Aborting a staging run deletes it and nothing else; its workers can write no more."""
    run_once(root, DAY, [9])
    stage = StagedRun.open(root, DAY, "given-up")
    stage.write_part(0, part_table(0, 3))
    stage.abort()
    assert count(root) == 9
    assert not (root / "scores" / "_staging" / "given-up").exists()
    with pytest.raises(StagingMissing):
        stage.write_part(1, part_table(1, 3))


def test_sweep_spares_live_staging_of_other_dates_until_it_goes_stale(root: Path) -> None:
    """A staging run of another date may belong to a live run elsewhere: sweep keeps it
    until nothing in it changed for ``stale_after``."""
    live = StagedRun.open(root, OTHER_DAY, "other-day")
    live.write_part(0, part_table(0, 1))
    run_once(root, DAY, [1])
    assert (root / "scores" / "_staging" / "other-day").is_dir()

    report = storage.sweep(root, stale_after=timedelta(0))

    assert report.removed == ("_staging/other-day",)
    with pytest.raises(StagingMissing):
        live.write_part(1, part_table(1, 1))


def test_leftovers_of_a_sweep_killed_mid_delete_are_swept_at_once(root: Path) -> None:
    """A sweep killed while deleting a staging folder leaves either a hidden, renamed folder
    or (from an older layout) a marker-less folder holding some parts: neither belongs to a
    live run, and the next sweep removes both, however fresh they are."""
    run_once(root, DAY, [2])
    staging = root / "scores" / "_staging"
    renamed = StagedRun.open(root, OTHER_DAY, "renamed")
    renamed.write_part(0, part_table(0, 4))
    os.rename(staging / "renamed", staging / ".renamed.0123abcd.removed")
    half_deleted = StagedRun.open(
        root, OTHER_DAY, "half-deleted"
    )  # (this open sweeps the hidden one already)
    os.makedirs(staging / ".renamed.0123abcd.removed")
    half_deleted.write_part(0, part_table(0, 4))
    half_deleted.write_part(3, part_table(3, 4))
    (staging / "half-deleted" / storage.STAGE_MARKER).unlink()  # rmtree removed the marker first

    report = storage.sweep(root)

    assert sorted(report.removed) == ["_staging/.renamed.0123abcd.removed", "_staging/half-deleted"]
    assert list(staging.iterdir()) == [] and count(root) == 2
    with pytest.raises(StagingMissing):
        half_deleted.write_part(1, part_table(1, 1))


def test_sweep_repairs_the_view_after_the_home_folder_moved(root: Path, tmp_path: Path) -> None:
    """The view names files by absolute path; after MLOPS_HOME moves, sweep rebuilds it."""
    run_once(root, DAY, [12])
    moved = tmp_path / "moved"
    root.rename(moved)
    with pytest.raises(DataError):
        count(moved)
    storage.sweep(moved)
    assert count(moved) == 12


def test_reader_errors_are_platform_errors(root: Path) -> None:
    """Reading before anything was committed, or with bad SQL, raises a DataError."""
    with pytest.raises(DataError, match="nothing has been committed"):
        storage.query(root, "SELECT 1")
    storage.sweep(root)
    assert count(root) == 0
    with pytest.raises(DataError, match="no_such_table"):
        storage.query(root, "SELECT * FROM no_such_table")


# --------------------------------------------------------------------------- other processes

_HOLD_READ_LOCK = """
import time
from adapters import storage
with storage.reader(root, 10) as con:  # what query() holds
    con.execute("SELECT count(*) FROM scores").fetchall()
    held.set()
    time.sleep(hold_s)
"""


def test_a_writer_waits_for_readers_and_gives_up_with_warehouse_busy(
    root: Path, forkserver: multiprocessing.context.BaseContext
) -> None:
    """Given another process in the middle of a store query, a writer (opening a staging
    run takes the same write lock as commit) cannot get in: with a short timeout it raises
    WarehouseBusy; with a longer one it waits for the reader to finish and goes on."""
    run_once(root, DAY, [3])
    held = forkserver.Event()
    reader = spawn(forkserver, _HOLD_READ_LOCK, root=str(root), held=held, hold_s=1.5)
    try:
        wait_for(held.is_set, reader)
        start = time.monotonic()
        with pytest.raises(WarehouseBusy):
            StagedRun.open(root, DAY, "too-impatient", lock_timeout=0.3)
        assert time.monotonic() - start < 1.0
        stage = StagedRun.open(root, DAY, "patient", lock_timeout=10)
        assert time.monotonic() - start > 1.0
        stage.commit([stage.write_part(0, part_table(0, 4))], record())
    finally:
        reader.join(30)
    assert count(root) == 4


def test_an_outside_duckdb_reader_neither_blocks_a_commit_nor_sees_it_written_in_place(
    root: Path, forkserver: multiprocessing.context.BaseContext
) -> None:
    """Given a notebook-style DuckDB connection held open on warehouse.duckdb, a commit
    still goes through at once; the bytes of the file that connection has open do not
    change (a commit publishes a new file with one rename, so a process killed in the
    middle of DuckDB writing its blocks can never leave the warehouse unreadable), and the
    next store query sees the new run."""
    run_once(root, DAY, [3])
    warehouse = root / "warehouse.duckdb"
    held = forkserver.Event()
    outside = spawn(forkserver, _OUTSIDE_READER, path=str(warehouse), held=held, hold_s=3.0)
    fd = os.open(warehouse, os.O_RDONLY)
    try:
        wait_for(held.is_set, outside)
        before = os.pread(fd, 1 << 24, 0)
        start = time.monotonic()
        run_once(root, DAY, [5, 6])
        assert time.monotonic() - start < 2.5, "the commit waited for the outside reader"
        assert os.pread(fd, 1 << 24, 0) == before
        assert os.fstat(fd).st_ino != warehouse.stat().st_ino
    finally:
        os.close(fd)
        outside.join(30)
    assert outside.exitcode == 0
    assert count(root) == 11
    assert sorted(p.name for p in root.iterdir() if "warehouse" in p.name) == [
        ".warehouse.lock",
        "warehouse.duckdb",
    ]


_OUTSIDE_READER = """
import time
import duckdb
con = duckdb.connect(path, read_only=True)
assert con.execute("SELECT count(*) FROM scores").fetchall() == [(3,)]
held.set()
time.sleep(hold_s)
assert con.execute("SELECT sum(rows_out) FROM score_runs").fetchall() == [(3,)]
con.close()
"""


def test_a_write_ahead_log_left_beside_the_warehouse_is_folded_in_before_a_write(
    root: Path,
) -> None:
    """A warehouse written in place by another tool (or an older release) and left with
    a WAL: the next writer folds the log into the file first, so no committed row is lost
    and no log is left behind."""
    import duckdb

    run_once(root, DAY, [3])
    con = duckdb.connect(str(root / "warehouse.duckdb"))
    con.execute("PRAGMA disable_checkpoint_on_shutdown")
    con.execute("CREATE TABLE notes AS SELECT 'kept' AS note")
    con.close()
    assert (root / "warehouse.duckdb.wal").exists()
    run_once(root, OTHER_DAY, [4])
    assert not (root / "warehouse.duckdb.wal").exists()
    assert storage.query(root, "SELECT note FROM notes")["note"].to_pylist() == ["kept"]
    assert count(root) == 7


_POLL_READER = """
import time
from adapters import storage
from mlops.errors import PlatformError
sql = (
    "SELECT 'view' AS source, tag, count(*) AS n FROM scores GROUP BY ALL "
    "UNION ALL "
    "SELECT 'pointer' AS source, tag, count(*) AS n FROM read_parquet('" + glob + "') GROUP BY ALL"
)
seen = []
while not stop.is_set():
    try:
        rows = storage.query(root, sql).to_pylist()
        seen.append(sorted((r["source"], r["tag"], r["n"]) for r in rows))
    except PlatformError as exc:
        seen.append([("error", str(exc)[:200], 0)])
    polls.value += 1
    time.sleep(0.005)
out.send(seen)
"""


def test_a_reader_during_recommits_sees_one_whole_run(
    root: Path, forkserver: multiprocessing.context.BaseContext
) -> None:
    """Given run A (300 rows tagged A) and run B (350 rows tagged B) committed in turn for
    the same date many times, a reader process polling all the while, through the view
    and through the date pointer, only ever sees all of A or all of B."""
    a_parts, b_parts = [100, 100, 100], [70, 70, 70, 70, 70]
    run_once(root, DAY, a_parts, tag="A")
    stop = forkserver.Event()
    polls = forkserver.RawValue("i", 0)
    receive, send = forkserver.Pipe(duplex=False)
    glob = f"{root}/scores/run_date=*/*.parquet"
    reader = spawn(forkserver, _POLL_READER, root=str(root), glob=glob, stop=stop, polls=polls, out=send)
    try:
        wait_for(lambda: polls.value > 0, reader)
        commits = 0
        for i in range(16):
            tag, parts = ("B", b_parts) if i % 2 == 0 else ("A", a_parts)
            stage = StagedRun.open(root, DAY, f"run-{i}-{tag}")
            infos = [stage.write_part(j, part_table(j, n, tag)) for j, n in enumerate(parts)]
            stage.commit(infos, record())
            commits += 1
    finally:
        stop.set()
        seen = receive.recv() if receive.poll(30) else None
        reader.join(30)

    whole_a = [("pointer", "A", 300), ("view", "A", 300)]
    whole_b = [("pointer", "B", 350), ("view", "B", 350)]
    assert seen, "the reader reported nothing"
    mixed = [s for s in seen if s not in (whole_a, whole_b)]
    assert mixed == [], f"{len(mixed)} of {len(seen)} reads saw a mix: {mixed[:3]}"
    assert whole_a in seen and whole_b in seen, f"{commits} commits, {len(seen)} reads"


# The scorer run in a child that the test kills. It publishes its phase in shared memory
# so the parent knows where each kill landed. Its parts are the parent's tables tagged
# with the run id, so a reader can tell which run every row came from.
SWEEP, OPEN, WRITE, COMMIT, COMMITTED = 1, 2, 3, 4, 5
PHASES = {SWEEP: "sweep", OPEN: "open", WRITE: "write", COMMIT: "commit", COMMITTED: "committed"}
_CRASHING_SCORER = """
import datetime as dt
import duckdb
import pyarrow as pa
from adapters import storage

def tagged(table, run_id):  # as tagged() below
    return table.append_column("run_tag", pa.array([run_id] * table.num_rows, pa.string()))

day = dt.date.fromisoformat(day)
while True:
    phase.value = SWEEP
    storage.sweep(root)
    run_id = storage.new_run_id()
    phase.value = OPEN
    stage = storage.StagedRun.open(root, day, run_id)
    infos = []
    for i, table in enumerate(tables):
        phase.value = WRITE
        infos.append(stage.write_part(i, tagged(table, run_id)))
    phase.value = COMMIT
    stage.commit(infos, run_record)
    phase.value = COMMITTED
"""


def tagged(table: pa.Table, run_id: str) -> pa.Table:
    return table.append_column("run_tag", pa.array([run_id] * table.num_rows, pa.string()))


def test_a_killed_scoring_run_rerun_leaves_exactly_the_rows_of_a_clean_run(
    root: Path, tmp_path: Path, forkserver: multiprocessing.context.BaseContext
) -> None:
    """Given a scorer process that sweeps, stages four parts and commits in a loop, when it
    is SIGKILLed again and again at random points (in sweep, open, part writes and inside
    commit), then after every kill readers see either nothing or exactly one whole run
    (the one score_runs names), and a clean re-run leaves exactly the rows and files of
    the same run made in a fresh folder: one run folder, one pointer, no stray file."""
    tables = [part_table(i, rows) for i, rows in enumerate([300, 250, 200, 1])]
    clean = pa.concat_tables(tables).sort_by("transaction_id")
    names = {
        "root": str(root),
        "day": DAY.isoformat(),
        "tables": tables,
        "run_record": record(rows_in=clean.num_rows),
        "SWEEP": SWEEP,
        "OPEN": OPEN,
        "WRITE": WRITE,
        "COMMIT": COMMIT,
        "COMMITTED": COMMITTED,
    }
    rng = random.Random(20250301)
    killed_in: list[str] = []
    targets = [COMMIT, WRITE, COMMIT, None, COMMIT, SWEEP, OPEN, COMMIT, None, COMMIT] * 2
    for target in targets:
        phase = forkserver.RawValue("i", 0)
        scorer = spawn(forkserver, _CRASHING_SCORER, **names, phase=phase)
        if target is None:  # anywhere in the first few loops
            wait_for(lambda: phase.value != 0, scorer)  # noqa: B023 (used at once)
            time.sleep(rng.uniform(0, 0.8))
        else:
            wait_for(lambda: phase.value == target, scorer)  # noqa: B023 (used at once)
            time.sleep(rng.uniform(0, 0.08 if target == COMMIT else 0.01))
        killed_in.append(PHASES.get(phase.value, "start"))
        os.kill(scorer.pid, signal.SIGKILL)
        scorer.join(10)
        assert scorer.exitcode == -signal.SIGKILL, "the scorer died of something else"

        if storage.committed_dates(root):
            seen = storage.query(
                root,
                "SELECT s.*, r.run_id FROM scores s JOIN score_runs r USING (run_date)",
            )
            assert set(seen["run_tag"].to_pylist()) == set(seen["run_id"].to_pylist())
            assert len(set(seen["run_tag"].to_pylist())) == 1
            assert seen.select(clean.column_names).sort_by("transaction_id").equals(clean)

    assert killed_in.count("commit") >= 5, killed_in

    def clean_run(home: Path) -> pa.Table:
        storage.sweep(home)
        stage = StagedRun.open(home, DAY, "rerun")
        infos = [stage.write_part(i, tagged(t, "rerun")) for i, t in enumerate(tables)]
        stage.commit(infos, record(rows_in=clean.num_rows))
        return storage.query(home, "SELECT * FROM scores ORDER BY transaction_id")

    rerun, fresh = clean_run(root), clean_run(tmp_path / "fresh")
    assert rerun.equals(fresh)
    assert rerun.select(clean.column_names).equals(clean)
    assert (
        tree(root / "scores")
        == tree(tmp_path / "fresh" / "scores")
        == {
            "_staging",
            "_pending",
            "_runs",
            f"_runs/run_date={DAY}",
            f"_runs/run_date={DAY}/rerun",
            *(f"_runs/run_date={DAY}/rerun/part-0000{i}.parquet" for i in range(4)),
            f"_runs/run_date={DAY}/rerun/_manifest.json",
            f"run_date={DAY} -> _runs/run_date={DAY}/rerun",
        }
    )
    assert storage.query(root, "SELECT count(*) AS n FROM score_runs")["n"].to_pylist() == [1]
    assert not list(root.glob(".warehouse.duckdb.*")), "a killed writer's working copy was left"


# --------------------------------------------------------------------------- read-only queries


@pytest.fixture
def published(root: Path, tmp_path: Path) -> Path:
    """A store with one committed run and a replay report, and files outside it worth stealing."""
    import pyarrow.parquet as pq

    from adapters import score_reports
    from mlops.scoring import ModelRef
    from mlops.stats import AgreementReport

    info = run_once(root, DAY, [30, 20])
    ref = ModelRef("fraud", 7, "champion", 0.5, "d" * 64)
    cmp = ModelRef("fraud", 8, "challenger", 0.5, "e" * 64)
    report = AgreementReport(50, 0.99, 0.98, 0.01, 0.02, 0.3, 0.31, 0.1, 0.11)
    score_reports.write_comparison(root, DAY, info.run_id, ref, cmp, report)
    (tmp_path / "secret.csv").write_text("user,password\nadmin,hunter2\n")
    (tmp_path / "secret.txt").write_text("hunter2\n")
    pq.write_table(pa.table({"password": ["hunter2"]}), tmp_path / "secret.parquet")
    duckdb.connect(str(tmp_path / "other.duckdb")).close()
    return root


def test_read_queries_over_scores_runs_and_reports_still_work(published: Path) -> None:
    """SELECT, WITH, FROM-first, DESCRIBE and SUMMARIZE over ``scores``, ``score_runs`` and the
    replay report tables answer as before, with parameters too."""
    root = published
    assert count(root) == 50
    with_cte = "WITH s AS (SELECT * FROM scores) SELECT count(*) AS n FROM s WHERE run_date = ?"
    assert storage.query(root, with_cte, [DAY])["n"].to_pylist() == [50]
    assert storage.query(root, "FROM score_runs SELECT rows_out")["rows_out"].to_pylist() == [50]
    got = storage.query(root, "SELECT compared_version, psi FROM score_comparisons").to_pylist()
    assert got == [{"compared_version": 8, "psi": 0.01}]
    columns = storage.query(root, "DESCRIBE scores")["column_name"].to_pylist()
    assert {"transaction_id", "score", "tag", "run_date"} <= set(columns)
    assert storage.query(root, "SUMMARIZE score_runs").num_rows > 5
    files = storage.query(root, f"SELECT count(*) AS n FROM glob('{root}/scores/**/*.parquet')")
    assert files["n"].to_pylist() == [2]  # the store's own files stay readable


ESCAPES = {
    "read_csv outside": "SELECT * FROM read_csv('{out}/secret.csv')",
    "read_parquet outside": "SELECT * FROM read_parquet('{out}/secret.parquet')",
    "read_text outside": "SELECT content FROM read_text('{out}/secret.txt')",
    "read_text /etc": "SELECT content FROM read_text('/etc/passwd')",
    "dot-dot out of the store": "SELECT * FROM read_csv('{root}/scores/../../secret.csv')",
    "glob outside": "SELECT * FROM glob('{out}/*')",
    "COPY TO": "COPY (SELECT * FROM scores) TO '{out}/stolen.csv'",
    "COPY TO inside the store": "COPY (SELECT 1) TO '{root}/scores/planted.csv'",
    "EXPORT DATABASE": "EXPORT DATABASE '{out}/export'",
    "ATTACH": "ATTACH '{out}/other.duckdb' AS other",
    "ATTACH the warehouse writable": "ATTACH '{root}/warehouse.duckdb' AS rw",
    "DETACH": "DETACH warehouse",
    "INSTALL": "INSTALL httpfs",
    "LOAD": "LOAD httpfs",
    "SET to unlock": "SET enable_external_access = true",
    "RESET": "RESET lock_configuration",
    "PRAGMA": "PRAGMA enable_checkpoint_on_shutdown",
    "CALL": "CALL checkpoint()",
    "multi-statement": "SELECT 1; COPY (SELECT 1) TO '{out}/stolen.csv'",
    "SET then SELECT": "SET enable_external_access = true; SELECT * FROM read_csv('{out}/secret.csv')",
    "INSERT": "INSERT INTO score_runs SELECT * FROM score_runs",
    "DELETE": "DELETE FROM score_runs",
    "UPDATE": "UPDATE score_comparisons SET psi = 0",
    "CREATE TABLE": "CREATE TABLE memory.stolen AS SELECT * FROM read_csv('{out}/secret.csv')",
    "DROP": "DROP VIEW scores",
    "EXPLAIN ANALYZE": "EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}/stolen.csv'",
}


@pytest.mark.parametrize("sql", list(ESCAPES.values()), ids=list(ESCAPES))
def test_a_query_cannot_read_write_attach_or_configure_anything(
    published: Path, tmp_path: Path, sql: str
) -> None:
    """Every way out of a read-only query is refused with a one-line error, and nothing changed:
    no file written, the warehouse and its rows as they were."""
    root = published
    before = tree(tmp_path)
    warehouse = (root / "warehouse.duckdb").read_bytes()
    with pytest.raises(DataError) as err:
        storage.query(root, sql.format(out=tmp_path, root=root))
    assert "\n" not in str(err.value)
    assert "hunter2" not in str(err.value)
    assert tree(tmp_path) == before
    assert (root / "warehouse.duckdb").read_bytes() == warehouse
    assert count(root) == 50


RUNAWAY = {
    "time": (
        "SELECT count(*) FROM range(100000000000) a, range(10) b",
        {"timeout_seconds": 0.5},
        "after 0.5 s",
    ),
    "memory": ("SELECT list(range) FROM range(100000000)", {"memory_limit_mb": 64}, "more than 64 MB"),
    "rows": ("SELECT * FROM range(11)", {"max_rows": 10}, "more than 10 rows"),
}


@pytest.mark.parametrize("case", list(RUNAWAY), ids=list(RUNAWAY))
def test_a_runaway_query_is_stopped_at_its_limit_and_frees_the_store(published: Path, case: str) -> None:
    """A query past its time, memory or result-row limit is stopped with a one-line error naming
    the limit; the read lock is released (a writer commits right after) and the warehouse is intact."""
    from mlops.settings import QueryConfig

    root = published
    sql, limit, says = RUNAWAY[case]
    limits = QueryConfig(**limit)
    with pytest.raises(DataError, match=says) as err:
        storage.query(root, sql, limits=limits)
    assert "\n" not in str(err.value)
    assert storage.query(root, "SELECT * FROM range(10)", limits=limits).num_rows == 10
    run_once(root, DAY + timedelta(days=1), [5])
    assert count(root) == 55


def test_stream_queries_have_the_same_limits(tmp_path: Path) -> None:
    """``mlops stream query`` stops a runaway query the same way."""
    import pyarrow.parquet as pq

    from adapters.warehouse_query import query_stream
    from mlops.settings import QueryConfig

    pq.write_table(pa.table({"score": [0.1, 0.2, 0.3]}), tmp_path / "part-0-3.parquet")
    assert query_stream(tmp_path, "SELECT count(*) AS n FROM stream_scores")["n"].to_pylist() == [3]
    with pytest.raises(DataError, match="more than 2 rows"):
        query_stream(tmp_path, "SELECT * FROM stream_scores", QueryConfig(max_rows=2))
    with pytest.raises(DataError, match="after 0.5 s"):
        query_stream(tmp_path, RUNAWAY["time"][0], QueryConfig(timeout_seconds=0.5))


def test_statements_other_than_one_select_are_refused_before_they_run() -> None:
    """The parser step names what it refused: several statements, or the statement's type."""
    from adapters.warehouse_query import QueryRefused, check_read_only

    assert check_read_only("SELECT 1") == "SELECT 1"
    with pytest.raises(QueryRefused, match="2 statements"):
        check_read_only("SELECT 1; SELECT 2")
    with pytest.raises(QueryRefused, match="COPY statement refused"):
        check_read_only("COPY scores TO 'x.csv'")
    with pytest.raises(QueryRefused, match="does not parse"):
        check_read_only("SELEC 1")
    with pytest.raises(QueryRefused, match="empty"):
        check_read_only("  ")


SLIPPED = [
    "SELECT * FROM read_csv('{out}/secret.csv')",
    "COPY (SELECT 1) TO '{out}/stolen.csv'",
    "ATTACH '{out}/other.duckdb' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SET allowed_directories = ['/']",
    "SET autoload_known_extensions = true",
]


@pytest.mark.parametrize("sql", SLIPPED)
def test_a_statement_that_slips_past_the_parser_still_cannot_escape(
    published: Path, tmp_path: Path, sql: str
) -> None:
    """The confined connection itself refuses files outside the store, extensions and setting
    changes, whatever statement reaches it; the store's own data stays readable."""
    from adapters.warehouse_query import confine

    con = duckdb.connect(":memory:")
    con.execute(f"ATTACH '{published}/warehouse.duckdb' AS warehouse (READ_ONLY)")
    con.execute("USE warehouse")
    confine(con, [published / "scores"])
    before = tree(tmp_path)
    with pytest.raises(duckdb.Error):
        con.execute(sql.format(out=tmp_path))
    assert tree(tmp_path) == before
    assert con.execute("SELECT count(*) FROM scores").fetchall() == [(50,)]
    con.close()


# --------------------------------------------------------------------------- history and rebuild


def test_a_stray_run_folder_is_never_read_and_one_date_reads_through_scores_on(root: Path) -> None:
    """The views glob the run folders but read only the run score_runs publishes for a date:
    a folder left beside it (a killed commit's orphan) adds no row. ``scores_on(d)`` reads one
    date's run and nothing else."""
    run_once(root, DAY, [3, 2])
    run_once(root, OTHER_DAY, [4])
    orphan = root / "scores" / "_runs" / f"run_date={DAY}" / "orphan"
    orphan.mkdir()
    import pyarrow.parquet as pq

    pq.write_table(part_table(0, 7, tag="orphan"), orphan / "part-00000.parquet")
    assert count(root) == 9
    assert storage.query(root, "SELECT DISTINCT tag FROM scores")["tag"].to_pylist() == ["x"]
    one = storage.query(root, "SELECT count(*) AS n, min(run_date) AS d FROM scores_on(?)", [DAY])
    assert one.to_pylist() == [{"n": 5, "d": DAY}]
    storage.sweep(root)  # no commit left work for it: the orphan is not looked for
    assert orphan.exists()
    storage.sweep(root, full=True)
    assert not orphan.exists() and count(root) == 9


def with_windows(table: pa.Table) -> pa.Table:
    """``table`` with two rolling-window feature columns, as a window-feature model writes."""
    n = table.num_rows
    return table.append_column("amount_sum_7d", pa.array([10.5] * n, pa.float64())).append_column(
        "txn_count_7d", pa.array([3] * n, pa.int64())
    )


def run_wide(root: Path, day: date, rows: int, run_id: str | None = None) -> storage.CommitInfo:
    stage = StagedRun.open(root, day, run_id or storage.new_run_id())
    return stage.commit([stage.write_part(0, with_windows(part_table(0, rows)))], record(rows_in=rows))


def view_sql(root: Path) -> str:
    with storage.reader(root) as con:
        (sql,) = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'scores'").fetchone()
    return sql


def test_dates_of_different_columns_read_as_the_union_of_their_columns(root: Path) -> None:
    """A plain run for one date and a run with two extra window-feature columns for the next
    are both committed; ``scores`` has the union of the columns (NULL for the plain date),
    ``scores_on`` gives each date its own rows and columns, either date can be replaced, and
    a lost warehouse is rebuilt to the same rows."""
    run_once(root, DAY, [3, 2])
    run_wide(root, OTHER_DAY, 4)
    rows = storage.query(
        root,
        "SELECT run_date, count(*) AS n, count(amount_sum_7d) AS a, sum(txn_count_7d) AS t "
        "FROM scores GROUP BY ALL ORDER BY 1",
    )
    assert rows.to_pylist() == [
        {"run_date": DAY, "n": 5, "a": 0, "t": None},
        {"run_date": OTHER_DAY, "n": 4, "a": 4, "t": 12},
    ]
    assert set(storage.query(root, "SELECT * FROM scores LIMIT 0").column_names) == {
        "transaction_id",
        "score",
        "tag",
        "amount_sum_7d",
        "txn_count_7d",
        "run_date",
    }
    assert storage.query(root, "SELECT count(*) AS n FROM scores_on(?)", [DAY])["n"].to_pylist() == [5]
    wide_day = storage.query(root, "SELECT * FROM scores_on(?)", [OTHER_DAY])
    assert wide_day.num_rows == 4 and wide_day["txn_count_7d"].to_pylist() == [3] * 4
    assert "union_by_name" in view_sql(root)

    run_wide(root, DAY, 6)  # the plain date replaced by a wide run
    run_once(root, OTHER_DAY, [1])  # and the wide date by a plain one
    assert storage.query(
        root, "SELECT run_date, count(*) AS n, count(txn_count_7d) AS t FROM scores GROUP BY ALL ORDER BY 1"
    ).to_pylist() == [{"run_date": DAY, "n": 6, "t": 6}, {"run_date": OTHER_DAY, "n": 1, "t": 0}]
    assert storage.query(root, "SELECT count(*) AS n FROM scores_on(?)", [OTHER_DAY])["n"].to_pylist() == [1]

    before = storage.query(root, "SELECT * FROM scores ORDER BY ALL")
    runs_before = storage.query(root, "SELECT * FROM score_runs ORDER BY run_date")
    (root / "warehouse.duckdb").unlink()
    assert storage.rebuild(root) == [DAY, OTHER_DAY]
    assert storage.query(root, "SELECT * FROM scores ORDER BY ALL").equals(before)
    assert storage.query(root, "SELECT * FROM score_runs ORDER BY run_date").equals(runs_before)
    assert "union_by_name" in view_sql(root)


def test_a_column_of_another_type_is_refused_with_both_types_named(root: Path) -> None:
    """A run whose ``tag`` column is an integer while another date's is a string is refused
    with one line naming the column and both types; nothing is published and the run can be
    committed once fixed."""
    run_once(root, DAY, [3])
    stage = StagedRun.open(root, OTHER_DAY, "ints")
    table = part_table(0, 2).set_column(2, "tag", pa.array([1, 1], pa.int64()))
    with pytest.raises(storage.SchemaConflict) as raised:
        stage.commit([stage.write_part(0, table)], record(rows_in=2))
    message = str(raised.value)
    assert "\n" not in message
    assert "column 'tag' is int64 in this run, string in the run of 2025-03-01" in message
    assert storage.committed_dates(root) == [DAY] and count(root) == 3
    assert "union_by_name" not in view_sql(root)
    stage.commit([stage.write_part(0, part_table(0, 2))], record(rows_in=2))  # fixed, same run
    assert count(root) == 5


def test_a_single_schema_store_reads_one_glob_bound_by_its_first_file(root: Path) -> None:
    """While every committed run has one schema the views read without ``union_by_name``
    (only the first footer is read to bind); a run of another schema switches them to it,
    and replacing that run by one of the common schema switches them back. Replacing the
    only committed date by a run of another schema keeps one schema."""
    run_once(root, DAY, [3])
    narrow = StagedRun.open(root, DAY, "narrow")
    narrow.commit([narrow.write_part(0, part_table(0, 2).drop_columns(["tag"]))], record())
    assert storage.query(root, "SELECT * FROM scores").column_names == ["transaction_id", "score", "run_date"]
    assert "union_by_name" not in view_sql(root)
    run_once(root, DAY, [3])
    run_once(root, OTHER_DAY, [2])
    single = view_sql(root)
    assert "union_by_name" not in single
    run_wide(root, date(2025, 3, 3), 1)
    assert "union_by_name = true" in view_sql(root)
    run_once(root, date(2025, 3, 3), [4])
    assert view_sql(root) == single
    assert count(root) == 9


def test_a_warehouse_without_score_schemas_learns_them_from_the_parts(root: Path) -> None:
    """A warehouse written before score_schemas existed gets the table filled from each
    committed run's first part by the next writer, and a wide run then reads as the union."""
    run_once(root, DAY, [3])
    run_once(root, OTHER_DAY, [2])
    con = duckdb.connect(str(root / "warehouse.duckdb"))
    con.execute("DROP TABLE score_schemas")
    con.close()
    run_wide(root, date(2025, 3, 3), 1)
    assert storage.query(root, "SELECT count(*) AS n FROM score_schemas")["n"].to_pylist() == [3]
    assert storage.query(root, "SELECT count(*) AS n, count(txn_count_7d) AS t FROM scores").to_pylist() == [
        {"n": 6, "t": 1}
    ]


def test_format_1_runs_and_dictionary_encoded_runs_read_as_one_store(root: Path) -> None:
    """A run committed by the previous format (plain string parts, manifest format 1) and a
    format 2 run whose string column is dictionary-encoded, for two dates: the second commit
    is accepted (same logical schema), both read back as strings through ``scores`` and
    ``scores_on``, and a lost warehouse is rebuilt from both manifests."""
    import json

    from mlops.scoring import constant_strings

    run_once(root, DAY, [3], tag="old")
    old_dir = next((root / "scores" / "_runs" / f"run_date={DAY}").iterdir())
    manifest = json.loads((old_dir / storage.MANIFEST).read_text())
    assert manifest["format"] == storage.MANIFEST_FORMAT == 2
    (old_dir / storage.MANIFEST).write_text(json.dumps({**manifest, "format": 1}))

    stage = StagedRun.open(root, OTHER_DAY, "dict")
    table = part_table(0, 4).set_column(2, "tag", constant_strings("new", 4))
    assert pa.types.is_dictionary(table.schema.field("tag").type)
    stage.commit([stage.write_part(0, table)], record(rows_in=4))

    both = storage.query(
        root, "SELECT run_date, tag, typeof(tag) AS t, count(*) AS n FROM scores GROUP BY ALL ORDER BY 1"
    )
    assert both.to_pylist() == [
        {"run_date": DAY, "tag": "old", "t": "VARCHAR", "n": 3},
        {"run_date": OTHER_DAY, "tag": "new", "t": "VARCHAR", "n": 4},
    ]
    assert storage.query(root, "SELECT DISTINCT tag FROM scores_on(?)", [OTHER_DAY])["tag"].to_pylist() == [
        "new"
    ]
    (root / "warehouse.duckdb").unlink()
    assert storage.rebuild(root) == [DAY, OTHER_DAY]
    assert storage.query(
        root, "SELECT tag, count(*) AS n FROM scores GROUP BY ALL ORDER BY 1"
    ).to_pylist() == [
        {"tag": "new", "n": 4},
        {"tag": "old", "n": 3},
    ]


def test_a_run_whose_dictionary_column_holds_numbers_is_still_another_schema(root: Path) -> None:
    """Only the encoding is ignored when schemas are compared: a dictionary column whose
    values are not the committed column's type is refused."""
    run_once(root, DAY, [3])
    stage = StagedRun.open(root, OTHER_DAY, "ints")
    table = part_table(0, 2).set_column(2, "tag", pa.array([1, 1]).dictionary_encode())
    with pytest.raises(IncompleteRun, match="column 'tag' is int64 in this run, string"):
        stage.commit([stage.write_part(0, table)], record(rows_in=2))
    assert storage.committed_dates(root) == [DAY]


def test_a_lost_warehouse_is_rebuilt_from_the_run_manifests(root: Path) -> None:
    """Every committed run leaves a manifest beside its parts; with warehouse.duckdb deleted,
    ``rebuild`` restores score_runs (same rows as before) and the views from the folders,
    ignoring a run folder without a manifest or with a part missing."""
    run_once(root, DAY, [3, 2])
    run_once(root, DAY, [6], tag="newer")
    run_once(root, OTHER_DAY, [4])
    before = storage.query(root, "SELECT * FROM score_runs ORDER BY run_date")
    rows_before = storage.query(root, "SELECT * FROM scores ORDER BY ALL")
    # A half-made run folder of a third date: parts without a manifest.
    half = root / "scores" / "_runs" / "run_date=2025-03-03" / "half"
    half.mkdir(parents=True)
    import pyarrow.parquet as pq

    pq.write_table(part_table(0, 5), half / "part-00000.parquet")
    (root / "warehouse.duckdb").unlink()

    assert storage.rebuild(root) == [DAY, OTHER_DAY]
    after = storage.query(root, "SELECT * FROM score_runs ORDER BY run_date")
    assert after.equals(before)
    assert storage.query(root, "SELECT * FROM scores ORDER BY ALL").equals(rows_before)
    assert not half.exists()
    run_once(root, OTHER_DAY, [1])  # the rebuilt warehouse takes commits as before
    assert count(root) == 7


def test_a_damaged_warehouse_is_moved_aside_and_rebuilt(root: Path) -> None:
    """A warehouse file that DuckDB cannot open is kept aside, not overwritten, and the
    rebuilt one has every committed run."""
    run_once(root, DAY, [3])
    (root / "warehouse.duckdb").write_bytes(b"not a database" * 100)
    assert storage.rebuild(root) == [DAY]
    assert count(root) == 3
    assert len(list(root.glob("warehouse.duckdb.damaged-*"))) == 1
