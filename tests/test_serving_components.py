"""Serving building blocks with real ONNX Runtime, Parquet and DuckDB: scoring threads, the
model pool, the prediction log, the admin token and the admin fake."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from mlops.datagen import fraud_schema, generate
from mlops.errors import ConfigError, DataError
from mlops.onnx_model import OnnxScorer
from mlops.predlog import PRIMARY, SHADOW, part_name
from mlops.rollout.degrade import spin_body
from mlops.settings import DatasetSchema, load_settings
from serving.auth import check_bearer, ensure_token, read_token, token_path
from serving.client import FakeServingAdmin, ServingRequestFailed
from serving.errors import BudgetExceeded, ModelTimeout
from serving.models import MEMORY_FACTOR, ModelPool, ModelWorker, build_model
from serving.predlog_store import PredictionLogStore
from serving.predlog_writer import LogRow, PredictionLogWriter
from serving.state import DesiredState, load_state, save_state

SCHEMA = fraud_schema()
REPO = Path(__file__).resolve().parent.parent


def slow_model(schema: DatasetSchema, steps_per_unit: float = 1e12, offset: float = 0.0) -> bytes:
    """A valid fraud-model ONNX graph (same inputs, a ``probabilities`` output) that spins in a
    Loop for ``(max(first feature) + offset) * steps_per_unit`` steps: by default rows whose
    first feature is 0 (the service's warm-up row) answer at once, real transactions never."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h

    first = schema.numeric_names[0]
    inputs = [h.make_tensor_value_info(n, T.FLOAT, [None, 1]) for n in schema.numeric_names]
    inputs += [h.make_tensor_value_info(n, T.STRING, [None, 1]) for n in schema.categorical_names]
    body = spin_body()
    nodes = [
        h.make_node("ReduceMax", [first], ["top"], keepdims=0),
        h.make_node("Add", ["top", "offset"], ["shifted"]),
        h.make_node("Mul", ["shifted", "scale"], ["steps_f"]),
        h.make_node("Cast", ["steps_f"], ["trip"], to=T.INT64),
        h.make_node("Loop", ["trip", "cond", "zero"], ["acc"], body=body),
        h.make_node("Mul", [first, "zero"], ["z"]),
        h.make_node("Mul", ["acc", "zero"], ["acc0"]),
        h.make_node("Add", ["z", "acc0"], ["p"]),
        h.make_node("Concat", ["p", "p"], ["probabilities"], axis=1),
    ]
    graph = h.make_graph(
        nodes,
        "slow",
        inputs,
        [h.make_tensor_value_info("probabilities", T.FLOAT, [None, 2])],
        [
            h.make_tensor("scale", T.FLOAT, [], [steps_per_unit]),
            h.make_tensor("offset", T.FLOAT, [], [offset]),
            h.make_tensor("cond", T.BOOL, [], [True]),
            h.make_tensor("zero", T.FLOAT, [], [0.0]),
        ],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def columns(n: int, seed: int = 1) -> dict[str, list]:
    frame = generate(n, seed=seed)
    return {c: frame[c].tolist() for c in SCHEMA.feature_names}


def run(coro):
    return asyncio.run(coro)


# ----------------------------------------------------------------------------- worker


def test_worker_scores_like_the_scorer_and_batches_concurrent_requests(small_model):
    """Concurrent submissions are answered with exactly the scorer's probabilities, each its own rows."""
    scorer = OnnxScorer(small_model, SCHEMA)
    worker = ModelWorker(scorer, "v1", max_batch_rows=64)
    parts = [columns(n, seed=n) for n in (1, 3, 2, 5, 1)]

    async def main():
        futures = [worker.submit(p, len(p["amount"]), time.monotonic() + 5) for p in parts]
        return await asyncio.gather(*futures)

    try:
        answers = run(main())
    finally:
        worker.stop()
    for p, got in zip(parts, answers, strict=True):
        np.testing.assert_allclose(got[:, 1], scorer.predict_proba(p), rtol=1e-6)


def test_the_mirror_lane_scores_the_same_on_a_lower_priority_thread(small_model):
    """Shadow copies go to a second worker of the same session whose thread runs ``nice``
    steps below the process (so users' requests win the cores); it answers the same
    probabilities and stops with its model."""
    model = build_model("fraud", 1, small_model, SCHEMA)
    lane = model.mirror_worker(7)
    assert (
        lane is not model.worker and model.mirror_worker(7) is lane and model.workers == (model.worker, lane)
    )
    assert model.mirror_worker(0) is model.worker
    part = columns(4)

    async def main():
        got = await lane.submit(part, 4, time.monotonic() + 5)
        return got, os.getpriority(os.PRIO_PROCESS, lane._thread.native_id)

    try:
        got, niceness = run(main())
    finally:
        model.close()
    np.testing.assert_allclose(got[:, 1], OnnxScorer(small_model, SCHEMA).predict_proba(part), rtol=1e-6)
    assert niceness == os.getpriority(os.PRIO_PROCESS, 0) + 7
    for worker in (model.worker, lane):
        worker._thread.join(timeout=5)
        assert not worker._thread.is_alive()


def test_a_hung_model_call_times_out_and_is_stopped():
    """A model that never finishes answers ModelTimeout at its deadline, and its run is terminated."""
    scorer = OnnxScorer(slow_model(SCHEMA), SCHEMA)
    worker = ModelWorker(scorer, "slow", max_batch_rows=8)
    assert columns(1)["amount"][0] > 0

    async def main():
        start = time.monotonic()
        futures = [worker.submit(columns(1), 1, start + 0.5) for _ in range(3)]

        async def watchdog():
            while worker.outstanding or worker.running_since:
                worker.expire(time.monotonic(), 0.5)
                await asyncio.sleep(0.02)

        dog = asyncio.ensure_future(watchdog())
        results = await asyncio.gather(*futures, return_exceptions=True)
        answered = time.monotonic() - start
        await asyncio.wait_for(dog, 5)  # the terminated run ends, nothing stays outstanding
        return results, answered

    try:
        results, answered = run(main())
    finally:
        worker.stop()
    assert all(isinstance(r, ModelTimeout) for r in results), results
    assert answered < 1.0
    assert worker.running_since == 0.0


# ----------------------------------------------------------------------------- pool


def test_a_model_that_hangs_on_its_warm_up_row_is_refused_at_load():
    """Loading a version runs one warm-up row under a deadline: a model that cannot answer it
    is refused (ModelFailed) instead of tying up a loader thread forever."""
    from serving.errors import ModelFailed

    start = time.monotonic()
    with pytest.raises(ModelFailed, match="warm-up"):
        build_model("m", 9, slow_model(SCHEMA, offset=1.0), SCHEMA, warmup_timeout=0.5)
    assert time.monotonic() - start < 5


def test_pool_evicts_least_recently_used_and_never_a_pinned_or_busy_model(small_model):
    """Over budget, the least recently used unpinned version goes; one in use is closed only on release."""
    size = int(len(small_model) * MEMORY_FACTOR)
    built: list[int] = []

    def loader(v: int):
        built.append(v)
        return build_model("m", v, small_model, SCHEMA)

    pool = ModelPool(loader, budget_bytes=3 * size)

    async def main():
        one = await pool.load(1, required=True)
        pool.pin({1})
        two = await pool.load(2, required=False)
        two.acquire()  # an in-flight request holds v2
        await pool.load(3, required=False)
        await pool.load(4, required=False)  # 4 > budget of 3: evicts v2 (LRU, unpinned)
        assert 2 not in pool and two.retired and not two.closed
        assert pool.used_bytes == 4 * size  # v2 is still charged while in use
        two.release()
        assert two.closed and pool.used_bytes == 3 * size
        await pool.load(5, required=False)  # evicts v3, never pinned v1
        assert sorted(m.version for m in pool.models) == [1, 4, 5] and not one.retired
        again = await asyncio.gather(pool.load(6, required=False), pool.load(6, required=False))
        assert again[0] is again[1] and built.count(6) == 1  # one load shared
        assert sorted(m.version for m in pool.models) == [1, 5, 6]
        pool.pin({1, 5, 6})
        with pytest.raises(BudgetExceeded):  # everything pinned: an optional load is refused
            await pool.load(7, required=False)
        assert 7 not in pool
        await pool.load(7, required=True)  # a slot load goes over budget rather than fail
        assert 7 in pool
        pool.close()

    run(main())


# ----------------------------------------------------------------------------- prediction log


def _row(
    rid: str, ts: float, role: str = PRIMARY, variant: str = "stable", version: int = 1, score: float = 0.3
):
    feats = {n: 1.0 for n in SCHEMA.numeric_names} | {n: "x" for n in SCHEMA.categorical_names}
    return LogRow(
        rid, ts, "u1", variant, role, "shadow", "m", version, score, score >= 0.2, 1.5, 200, None, feats
    )


def test_prediction_log_round_trip_views_and_feedback_join(tmp_path):
    """Logged answers and labels are flushed to Parquet and read back through DuckDB views:
    labelled joins the first label to primary answers only (a later one never replaces it),
    shadow_pairs pairs by request id."""
    writer = PredictionLogWriter(tmp_path / "predictions", tmp_path / "feedback", SCHEMA, flush_seconds=60)
    now = time.time()
    writer.log(_row("a", now))
    writer.log(_row("a", now, SHADOW, "candidate", 2, 0.1))
    writer.log(_row("b", now + 1))
    writer.feedback([("a", 0)], now + 2)
    writer.feedback([("a", 1)], now + 3)  # the first label counts
    assert writer.flush() == (3, 2)
    store = PredictionLogStore(tmp_path / "predictions", tmp_path / "feedback", SCHEMA)
    labelled = store.query("SELECT request_id, label FROM labelled ORDER BY request_id")
    assert labelled["request_id"].tolist() == ["a", "b"]
    assert labelled["label"].iloc[0] == 0 and labelled["label"].isna().iloc[1]
    assert store.first_labels() == {"a": 0}
    pairs = store.query("SELECT * FROM shadow_pairs")
    assert pairs[["request_id", "primary_version", "shadow_version"]].values.tolist() == [["a", 1, 2]]
    log = store.read_log(since=datetime.fromtimestamp(now + 0.5, UTC))
    assert log["request_id"].tolist() == ["b"] and "f_amount" in log.columns
    assert list(store.read_feedback()["label"]) == [0, 1]


def test_a_windowed_read_opens_only_the_files_committed_since_its_start(tmp_path):
    """A rollout tick reads the window since its step started: files committed before it
    (an earlier day's partition, or earlier today: the commit time is in the name) are never
    opened, so the cost follows the window, not the day's log. Proven with unreadable old
    files that a full scan trips over. A file the writer did not name (copied in by hand) is
    never read: only the writer's parts and a compaction's merged files count."""
    writer = PredictionLogWriter(tmp_path / "predictions", tmp_path / "feedback", SCHEMA, flush_seconds=60)
    now = time.time()
    writer.log(_row("old", now - 7200))
    writer.feedback([("old", 1)], now - 7200)
    writer.flush()
    writer.log(_row("new", now))
    writer.log(_row("new", now, SHADOW, "candidate", 2, 0.1))
    writer.feedback([("new", 0)], now)
    writer.flush()
    day = tmp_path / "predictions" / f"date={datetime.fromtimestamp(now, UTC):%Y-%m-%d}"
    for root in ("predictions", "feedback"):
        (tmp_path / root / "date=2020-01-01").mkdir()
        (tmp_path / root / "date=2020-01-01" / part_name(datetime(2020, 1, 1, tzinfo=UTC), 1, 1)).write_bytes(
            b"not parquet"
        )
    (day / part_name(datetime.fromtimestamp(now - 3600, UTC), 1, 1)).write_bytes(b"not parquet")
    shutil.copy(
        sorted(day.glob("part-*.parquet"))[-1], day / "copied-by-hand.parquet"
    )  # not the writer's: ignored
    store = PredictionLogStore(tmp_path / "predictions", tmp_path / "feedback", SCHEMA)
    since = datetime.fromtimestamp(now - 60, UTC)
    log = store.read_log(since=since)
    assert sorted(log["request_id"]) == ["new"] * 2 and sorted(log["role"]) == [PRIMARY, SHADOW]
    assert store.read_feedback(since=since)["request_id"].tolist() == ["new"]
    with pytest.raises(DataError, match="prediction"):
        store.read_log()  # everything: the old files are read and fail


def test_empty_prediction_log_reads_as_empty_frames(tmp_path):
    """Before anything is flushed, every view exists and is empty (with the log's columns)."""
    store = PredictionLogStore(tmp_path / "p", tmp_path / "f", SCHEMA)
    assert store.read_log().empty and "features_hash" in store.read_log().columns
    assert store.query("SELECT count(*) AS n FROM labelled")["n"].iloc[0] == 0


def test_a_crash_loses_only_the_unflushed_buffer(tmp_path):
    """A writer killed after one flush leaves that file intact, the rest of its buffer lost,
    and a half-written temporary file that readers never see (and a later start sweeps)."""
    code = f"""
import os, time, sys
sys.path.insert(0, {str(REPO)!r})
from pathlib import Path
from mlops.datagen import fraud_schema
from serving.predlog_writer import LogRow, PredictionLogWriter
s = fraud_schema()
w = PredictionLogWriter(Path({str(tmp_path)!r}) / "p", Path({str(tmp_path)!r}) / "f", s, flush_seconds=60)
feats = {{n: 1.0 for n in s.numeric_names}} | {{n: "x" for n in s.categorical_names}}
for i in range(10):
    w.log(LogRow(f"committed-{{i}}", time.time(), None, "stable", "primary", "single", "m", 1, 0.5, True, 1.0, 200, None, feats))
w.flush()
for i in range(5):
    w.log(LogRow(f"lost-{{i}}", time.time(), None, "stable", "primary", "single", "m", 1, 0.5, True, 1.0, 200, None, feats))
day = next((Path({str(tmp_path)!r}) / "p").glob("date=*"))
(day / ".part-crashed.parquet.tmp").write_bytes(b"PAR1 half a file")
os._exit(9)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    store = PredictionLogStore(tmp_path / "p", tmp_path / "f", SCHEMA)
    ids = store.query("SELECT request_id FROM predictions ORDER BY request_id")["request_id"].tolist()
    assert ids == sorted(f"committed-{i}" for i in range(10))
    tmp = next((tmp_path / "p").glob("date=*/.part-crashed.parquet.tmp"))
    os.utime(tmp, (time.time() - 7200, time.time() - 7200))
    writer = PredictionLogWriter(tmp_path / "p", tmp_path / "f", SCHEMA)
    writer.start()
    writer.stop()
    assert not tmp.exists()


def test_full_buffer_drops_and_counts_instead_of_growing(tmp_path):
    """When the buffer is full, further rows are counted as dropped, not buffered."""
    writer = PredictionLogWriter(tmp_path / "p", tmp_path / "f", SCHEMA, max_buffer_rows=3)
    results = [writer.log(_row(str(i), time.time())) for i in range(5)]
    assert results == [True, True, True, False, False] and writer.dropped == 2


# ----------------------------------------------------------------------------- token, state, fake


def test_admin_token_is_generated_once_private_and_read_by_clients(tmp_path):
    """Without a configured token one is generated (0600) and reused; a configured one wins;
    a client without either gets an error naming both options."""
    settings = load_settings(environ={"MLOPS_HOME": str(tmp_path)})
    with pytest.raises(ConfigError, match="MLOPS__SERVING__ADMIN_TOKEN"):
        read_token(settings)
    token = ensure_token(settings)
    assert len(token) >= 32 and ensure_token(settings) == token == read_token(settings)
    assert stat.S_IMODE(token_path(settings).stat().st_mode) == 0o600
    configured = load_settings(
        environ={"MLOPS_HOME": str(tmp_path), "MLOPS__SERVING__ADMIN_TOKEN": "s3cret-token-0123456789"}
    )
    assert read_token(configured) == ensure_token(configured) == "s3cret-token-0123456789"
    with pytest.raises(ConfigError, match="admin_token"):
        load_settings(environ={"MLOPS_HOME": str(tmp_path), "MLOPS__SERVING__ADMIN_TOKEN": "''"})
    assert check_bearer(None, token) == 401
    assert check_bearer("Basic abc", token) == 401
    assert check_bearer("Bearer wrong", token) == 403
    assert check_bearer(f"Bearer {token}", token) is None


def test_processes_racing_to_create_the_token_all_read_the_one_written_whole(tmp_path):
    """Threads racing to generate the admin token all return the same token, read whole by the
    ones that lost (never an empty or half-written file), and no temporary file is left."""
    import threading

    settings = load_settings(environ={"MLOPS_HOME": str(tmp_path)})
    start, tokens = threading.Barrier(16), []

    def first_use() -> None:
        start.wait()
        tokens.append(ensure_token(settings))

    threads = [threading.Thread(target=first_use) for _ in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert len(tokens) == 16 and len(set(tokens)) == 1 and len(tokens[0]) >= 32
    assert [p.name for p in token_path(settings).parent.iterdir()] == [token_path(settings).name]


def test_applied_state_survives_a_restart_file(tmp_path):
    """The persisted serving state round-trips, and a state of another model is ignored."""
    path = tmp_path / "run" / "serving-state.json"
    desired = DesiredState(mode="canary", weight_pct=5.0, salt="r1", stable_version=3, candidate_version=4)
    save_state(path, "m", desired, 7, "key-1")
    assert load_state(path, "m") == (desired, 7)
    assert load_state(path, "other") is None
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="delete it"):
        load_state(path, "m")


def test_fake_admin_validates_like_the_service_and_is_idempotent():
    """The admin fake refuses what the service refuses and replays an idempotency key's answer."""
    fake = FakeServingAdmin([1, 2])
    state = {"mode": "canary", "weight_pct": 10, "salt": "r", "stable_version": 1, "candidate_version": 2}
    first = fake.apply(state, key="k")
    assert first["changed"] and fake.apply(state, key="k") == first and fake.generation == 1
    assert fake.apply(state)["changed"] is False
    for bad, status in (
        ({**state, "weight_pct": 10.001}, 422),
        ({**state, "candidate_version": None}, 409),
        ({**state, "candidate_version": 9}, 404),
        ({**state, "colour": 1}, 422),
    ):
        with pytest.raises(ServingRequestFailed) as info:
            fake.apply(bad)
        assert info.value.status == status


def test_serving_is_planned_with_the_other_services(tmp_path):
    """`mlops server up` starts the BentoML service too, on the configured port, health-checked on liveness."""
    from adapters.services import plan

    settings = load_settings(environ={"MLOPS_HOME": str(tmp_path)})
    svc = {s.name: s for s in plan(settings)}["serving"]
    assert "serving.service:ScoringService" in svc.argv and str(settings.services.serving_port) in svc.argv
    assert svc.health_url.endswith("/v2/health/live") and svc.env["MLOPS_HOME"] == str(settings.home_path)


def test_window_filters_use_timezone_aware_bounds(tmp_path):
    """read_log keeps rows with since <= ts < until."""
    writer = PredictionLogWriter(tmp_path / "p", tmp_path / "f", SCHEMA)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(4):
        writer.log(_row(f"r{i}", (t0 + timedelta(seconds=i)).timestamp()))
    writer.flush()
    store = PredictionLogStore(tmp_path / "p", tmp_path / "f", SCHEMA)
    got = store.read_log(since=t0 + timedelta(seconds=1), until=t0 + timedelta(seconds=3))
    assert got["request_id"].tolist() == ["r1", "r2"]
