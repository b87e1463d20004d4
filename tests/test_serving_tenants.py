"""Many tenants in one service: tenant tokens, model ownership, quotas, isolation and eviction.

Pure parts (names, token bucket, quota) are tested directly. The service tests run the
real Starlette app and ``ServingRuntime`` in-process over a real MLflow-on-SQLite registry
holding per-tenant registered models (``fraud-detector--acme`` ...), driven through httpx's
ASGI transport, as tests/test_serving_security.py does for the single-model service.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlops.datagen import generate
from mlops.errors import ConfigError
from mlops.settings import Settings, load_settings
from mlops.tenancy import TenantQuota, TokenBucket, check_tenant_name, owner_of, tenant_model_name
from serving.models import MEMORY_FACTOR
from serving.predlog_store import predictions_dir
from serving.tenants import MODEL_OVERHEAD_BYTES, add_tenant, list_tenants, tenant_log_dir, tenants_dir
from tests.support.cli import run_cli
from tests.support.serving import configured, env_reaching, feature_records, serve_in_process

BASE = "fraud-detector"
SLOW_STEPS = 1e5  # ~0.3 s for a row whose amount is 1.0 (a warm-up row answers at once)


# ----------------------------------------------------------------------------- pure logic


def test_tenant_model_names_say_whose_model_it_is():
    """``<model>--<tenant>`` names the tenant's variant; a bad tenant name is refused."""
    assert tenant_model_name(BASE, "acme") == "fraud-detector--acme"
    assert owner_of("fraud-detector--acme") == "acme"
    assert owner_of("fraud-detector") is None
    assert owner_of("--acme") is None
    for bad in ("", "Acme", "a--b", "-a", "a-", "a/b", "x" * 41):
        with pytest.raises(ConfigError):
            check_tenant_name(bad)


def test_token_bucket_allows_the_burst_then_the_rate():
    """A full bucket admits ``burst`` requests at once, then one per ``1/rate`` seconds."""
    bucket = TokenBucket(rate=10.0, burst=3.0, updated=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.1)
    assert bucket.take(100.05) == pytest.approx(0.05)
    assert bucket.take(100.1) == 0.0


def test_quota_caps_requests_in_flight_and_says_when_to_retry():
    """Past ``max_concurrent`` in flight or past the rate, admission says how long to wait."""
    quota = TenantQuota(TokenBucket(rate=0.5, burst=100.0, updated=0.0), max_concurrent=2)
    assert quota.admit(0.0) == 0 and quota.admit(0.0) == 0
    assert quota.admit(0.0) == 1  # two in flight
    quota.done()
    assert quota.admit(0.0) == 0
    slow = TenantQuota(TokenBucket(rate=0.5, burst=1.0, updated=0.0), max_concurrent=8)
    assert slow.admit(0.0) == 0
    assert slow.admit(0.0) == 2  # a token every 2 s


def test_tenants_add_stores_only_a_hash_and_refuses_a_second_add(tmp_path: Path):
    """The token is returned once; the file holds its SHA-256 only, mode 0600; no reissue."""
    settings = load_settings(environ={"MLOPS_HOME": str(tmp_path / "home")})
    token = add_tenant(settings, "acme")
    path = tenants_dir(settings) / "acme.sha256"
    assert token not in path.read_text() and len(path.read_text().strip()) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="already exists"):
        add_tenant(settings, "acme")
    assert list_tenants(settings) == ["acme"]


def test_a_shared_lane_serves_tenants_round_robin_not_first_come(small_model: bytes, rows):
    """Given ten requests of one tenant queued before one request of another on a shared
    scoring thread taking one request per batch, the other tenant's request is answered
    second, not eleventh; every request gets its own model's score."""
    from mlops.onnx_model import OnnxScorer
    from serving.models import SharedLane

    schema = load_settings(environ={}).dataset
    scorer = OnnxScorer(small_model, schema, threads=1)
    columns = {n: [rows[0][n]] for n in schema.feature_names}

    async def scenario() -> list[str]:
        lane = SharedLane("test", max_batch_rows=1)
        await asyncio.sleep(0.05)  # the thread is idle: the wake-up comes after the whole turn
        answered: list[str] = []
        futures = []
        for key in ["noisy"] * 10 + ["quiet"]:  # all queued in one event-loop turn
            future = lane.submit(columns, 1, time.monotonic() + 30, scorer, key)
            future.add_done_callback(lambda f, k=key: answered.append(k))
            futures.append(future)
        results = await asyncio.gather(*futures)
        assert all(r.shape == (1, 2) for r in results) and lane.queued_by_key == {}
        lane.stop()
        return answered

    answered = asyncio.run(scenario())
    assert answered.index("quiet") == 1, answered


def test_a_shared_lane_scores_many_models_in_one_batch_each_row_with_its_own(small_model: bytes, rows):
    """Given requests for three sessions (two models with different weights, one of them
    loaded twice) queued in one event-loop turn on a shared thread, each request gets the
    scores its own model gives alone; a request whose values do not convert, on a fourth
    session, fails alone: the batch's other sessions still answer."""
    from mlops import modeling
    from mlops.onnx_model import OnnxScorer
    from mlops.settings import LogisticRegressionSpec
    from serving.errors import ModelFailed
    from serving.models import SharedLane

    schema = load_settings(environ={}).dataset
    other = modeling.to_onnx_bytes(
        modeling.fit(LogisticRegressionSpec(C=0.01, max_iter=200), generate(2000, seed=8), schema, 0), schema
    )
    scorers = [OnnxScorer(model, schema) for model in (small_model, other, small_model, other)]
    plan = [(i % 3, rows[i : i + 1 + i % 2]) for i in range(9)]  # (scorer, 1 or 2 records)
    alone = [
        scorers[k].predict_proba({n: [r[n] for r in recs] for n in schema.feature_names}) for k, recs in plan
    ]
    assert not np.allclose(
        alone[0][0], scorers[1].predict_proba({n: [rows[0][n]] for n in schema.feature_names})[0]
    )

    async def scenario() -> tuple[list[list[np.ndarray]], BaseException]:
        lane = SharedLane("test")
        deadline = time.monotonic() + 30
        answers, error = [], None
        for with_bad_row in (False, True):
            await asyncio.sleep(0.05)  # idle: everything below is queued before the thread wakes
            futures = [
                lane.submit(
                    {n: [r[n] for r in recs] for n in schema.feature_names},
                    len(recs),
                    deadline,
                    scorers[k],
                    f"t{k}",
                )
                for k, recs in plan
            ]
            if with_bad_row:
                bad = dict(plan[1][1][0]) | {schema.numeric_names[0]: "not a number"}
                failing = lane.submit(
                    {n: [bad[n]] for n in schema.feature_names}, 1, deadline, scorers[3], "t3"
                )
                error = (await asyncio.gather(failing, return_exceptions=True))[0]
            answers.append(await asyncio.gather(*futures))
        lane.stop()
        return answers, error

    answers, error = asyncio.run(scenario())
    for results in answers:
        for got, want in zip(results, alone, strict=True):
            np.testing.assert_allclose(got[:, 1], want, rtol=1e-4, atol=1e-6)
    assert isinstance(error, ModelFailed)


@pytest.fixture(scope="module")
def family() -> list[bytes]:
    """A gradient-boosting model (20 trees) and two versions of it with other leaf weights,
    and a logistic regression: models of two families."""
    from bench.support import weight_variants
    from mlops import modeling
    from mlops.settings import GradientBoostingSpec, LogisticRegressionSpec

    schema = load_settings(environ={}).dataset
    frame = generate(3000, seed=5)
    gb = modeling.to_onnx_bytes(modeling.fit(GradientBoostingSpec(n_estimators=20), frame, schema, 0), schema)
    lr = modeling.to_onnx_bytes(modeling.fit(LogisticRegressionSpec(max_iter=200), frame, schema, 0), schema)
    return [gb, *weight_variants(gb, 2, seed=3), lr]


def test_a_model_cut_before_its_estimator_scores_bit_for_bit_as_the_whole(family: list[bytes], rows):
    """Tree-ensemble and linear models cut by ``estimator_split``: the head run on the
    prefix's output gives exactly the whole graph's probabilities; the versions of one
    family share their prefix bytes, the two families do not; a graph without an estimator
    is not cut."""
    import onnx
    import onnxruntime as ort

    from mlops.onnx_model import PROBA_OUTPUT, OnnxScorer, estimator_split, session_options

    schema = load_settings(environ={}).dataset
    frame = {n: [r[n] for r in rows[:200]] for n in schema.feature_names}
    prefixes = []
    for model in family:
        split = estimator_split(model)
        assert split is not None
        prefix_onnx, head_onnx, cut = split
        prefixes.append(prefix_onnx)
        whole = OnnxScorer(model, schema)
        feeds = whole.feeds(frame)
        x = ort.InferenceSession(prefix_onnx, session_options(1)).run([cut], feeds)[0]
        got = ort.InferenceSession(head_onnx, session_options(1)).run([PROBA_OUTPUT], {cut: x})[0]
        assert np.array_equal(got, whole.session.run([PROBA_OUTPUT], feeds)[0])
    assert prefixes[0] == prefixes[1] == prefixes[2] != prefixes[3]
    assert len(set(family)) == 4
    bare = onnx.load_from_string(family[0])
    kept = [n for n in bare.graph.node if n.op_type != "TreeEnsembleClassifier"]
    del bare.graph.node[:]
    bare.graph.node.extend(kept)
    assert estimator_split(bare.SerializeToString()) is None


def test_a_lane_batch_over_one_family_preprocesses_once_and_scores_each_row_with_its_own_model(
    family: list[bytes], rows
):
    """Requests for three gradient-boosting versions sharing one prefix, and a logistic
    regression, queued in one event-loop turn: the family's rows go through one prefix run,
    then each version's estimator; every request gets bit for bit what its own model gives
    alone. With a value that does not convert, each model scores its rows alone: only the
    requests of that request's model fail."""
    import onnxruntime as ort

    from mlops.onnx_model import OnnxScorer, estimator_split, session_options
    from serving.errors import ModelFailed
    from serving.models import Head, Prefix, SharedLane

    schema = load_settings(environ={}).dataset
    scorers = [OnnxScorer(model, schema) for model in family]
    runs = []

    class Counted:  # the real prefix session, its runs counted
        def __init__(self, session: ort.InferenceSession):
            self.session = session

        def run(self, *args: Any) -> Any:
            runs.append(1)
            return self.session.run(*args)

    prefix_onnx, _, cut = estimator_split(family[0])  # type: ignore[misc]
    prefix = Prefix(Counted(ort.InferenceSession(prefix_onnx, session_options(1))), cut)  # type: ignore[arg-type]
    heads = [
        Head(prefix, ort.InferenceSession(estimator_split(m)[1], session_options(1))) for m in family[:3]
    ]  # type: ignore[index]
    plan = [(i % 4, rows[i : i + 1 + i % 2]) for i in range(10)]  # (model, 1 or 2 records)
    alone = [
        scorers[k].predict_proba({n: [r[n] for r in recs] for n in schema.feature_names}) for k, recs in plan
    ]

    async def scenario(bad: bool) -> list[Any]:
        lane = SharedLane("test")
        await asyncio.sleep(0.05)  # idle: everything below is queued before the thread wakes
        futures = []
        for j, (k, recs) in enumerate(plan):
            columns = {n: [r[n] for r in recs] for n in schema.feature_names}
            if bad and j == 1:
                columns[schema.numeric_names[0]] = ["not a number"] * len(recs)
            head = heads[k] if k < 3 else None
            futures.append(
                lane.submit(columns, len(recs), time.monotonic() + 30, scorers[k], f"t{k}", (), head)
            )
        out = await asyncio.gather(*futures, return_exceptions=True)
        lane.stop()
        return out

    answers = asyncio.run(scenario(bad=False))
    assert len(runs) == 1
    for got, want in zip(answers, alone, strict=True):
        assert np.array_equal(got[:, 1], want)
    answers = asyncio.run(scenario(bad=True))
    for (k, _), got, want in zip(plan, answers, alone, strict=True):
        if k == 1:
            assert isinstance(got, ModelFailed)
        else:
            assert np.array_equal(got[:, 1], want)


def test_requests_of_one_loop_turn_go_to_the_lane_already_being_woken(small_model: bytes, rows):
    """Two idle lanes: the first request of a turn picks the first lane and schedules its
    wake-up; the other tenants' requests of the same turn join it (one wake-up, one batch)
    instead of waking the second thread; a request after the batch was taken goes to the
    lane with fewer unanswered requests."""
    from mlops.onnx_model import OnnxScorer
    from serving.models import SharedLane, pick_lane

    schema = load_settings(environ={}).dataset
    scorer = OnnxScorer(small_model, schema)
    columns = {n: [rows[0][n]] for n in schema.feature_names}

    async def scenario() -> list[int]:
        lanes = [SharedLane(f"t{i}") for i in range(2)]
        for lane in lanes:  # each lane's thread has scored once and sleeps again
            await lane.submit(columns, 1, time.monotonic() + 30, scorer, "warm")
        await asyncio.sleep(0.05)
        picked, futures = [], []
        for tenant in ("a", "b", "c", "d"):
            lane = pick_lane(lanes, tenant)
            picked.append(lanes.index(lane))
            futures.append(lane.submit(columns, 1, time.monotonic() + 30, scorer, tenant))
        assert lanes[0].waking and not lanes[1].waking
        await asyncio.sleep(0)  # the turn ends: lane 0's thread is woken
        assert not lanes[0].waking
        picked.append(lanes.index(pick_lane(lanes, "e")))  # lane 0 has 4 unanswered
        await asyncio.gather(*futures)
        for lane in lanes:
            lane.stop()
        return picked

    assert asyncio.run(scenario()) == [0, 0, 0, 0, 1]


def test_a_tenant_never_gets_requests_on_every_lane():
    """Lanes are picked least busy first, but a tenant already on all lanes but one stays there."""
    from serving.models import SharedLane, pick_lane

    lanes = [SharedLane(f"t{i}") for i in range(2)]
    try:
        assert pick_lane(lanes, "a") is lanes[0]  # idle: the first, so light traffic batches
        lanes[0].queued_by_key["a"] = 1
        lanes[0].outstanding.append(object())  # type: ignore[arg-type]
        assert pick_lane(lanes, "b") is lanes[1]  # the less busy one
        assert pick_lane(lanes, "a") is lanes[0]  # not both lanes for tenant a
    finally:
        for lane in lanes:
            lane.outstanding.clear()
            lane.stop()


def test_tenant_logs_converted_together_land_each_in_its_own_partition(tmp_path: Path, rows):
    """Three tenants' buffered rows converted to Arrow in one pass are written each to its own
    tenant's files, exactly its rows; a row buffered after the conversion is written by the
    next flush; with a row Arrow refuses, nothing is converted together and only that
    tenant's bad row is dropped."""
    import pyarrow.parquet as pq

    from serving.predlog_writer import LogRow, PredictionLogWriter, prepare_flush

    schema = load_settings(environ={}).dataset

    def row(rid: str, features: dict[str, Any]) -> LogRow:
        return LogRow(
            rid, time.time(), None, "stable", "primary", "single", "m", 1, 0.5, True, 1.0, 200, None, features
        )

    def writers(root: Path) -> list[PredictionLogWriter]:
        out = [PredictionLogWriter(root / t / "p", root / t / "f", schema, flush_seconds=600) for t in "abc"]
        for w in out:
            w.start(thread=False)
        return out

    ws = writers(tmp_path / "ok")
    for i, w in enumerate(ws):
        for j in range(i + 1):
            w.log(row(f"{'abc'[i]}{j}", rows[j]))
    prepared = prepare_flush(ws)
    assert all(p is not None for p in prepared)
    ws[2].log(row("late", rows[5]))
    for w, p in zip(ws, prepared, strict=True):
        assert w.flush(p) == (len(p.rows), 0)
    assert ws[2].flush() == (1, 0)
    for i, t in enumerate("abc"):
        ids = pq.read_table(tmp_path / "ok" / t / "p").column("request_id").to_pylist()
        assert sorted(ids) == sorted([f"{t}{j}" for j in range(i + 1)] + (["late"] if t == "c" else []))

    ws = writers(tmp_path / "bad")
    for w in ws:
        w.log(row("good", rows[0]))
    ws[1].log(row("bad", rows[1] | {schema.numeric_names[0]: "not a number"}))
    assert prepare_flush(ws) == [None, None, None]
    assert [w.flush() for w in ws] == [(1, 0)] * 3 and [w.dropped for w in ws] == [0, 1, 0]


def test_tenant_logs_are_written_in_turns_over_the_period_and_at_once_past_the_row_bound(
    tmp_path: Path, rows
):
    """With a 4 s period and 8 tenants each with a row waiting, each second writes the files of
    two tenants, and every tenant's exactly once in the period; a tenant with
    ``log_flush_rows`` rows waiting is written at the next second, whatever its turn."""
    from serving.predlog_writer import LogRow
    from serving.tenants import TenantModels

    settings = load_settings(
        environ={
            "MLOPS_HOME": str(tmp_path / "home"),
            "MLOPS__SERVING__TENANTS__ENABLED": "true",
            "MLOPS__SERVING__TENANTS__LOG_FLUSH_SECONDS": "4",
            "MLOPS__SERVING__TENANTS__LOG_FLUSH_ROWS": "3",
        }
    )
    tenants = TenantModels(settings, lambda name: None, lambda *a: None, b"k" * 32)  # type: ignore[arg-type,return-value]
    names = [f"t{i}" for i in range(8)]

    def log(tenant: str, n: int) -> None:
        for j in range(n):
            tenants.writer(tenant).log(
                LogRow(
                    f"{tenant}-{j}",
                    time.time(),
                    None,
                    "stable",
                    "primary",
                    "single",
                    "m",
                    1,
                    0.5,
                    True,
                    1.0,
                    200,
                    None,
                    rows[j],
                )
            )

    def files(tenant: str) -> int:
        return len(list((tenant_log_dir(settings, tenant) / "predictions").glob("date=*/*.parquet")))

    try:
        for t in names:
            log(t, 1)
        written = []
        for tick in range(1, 5):
            tenants.flush_due(tick)
            written.append(sum(files(t) for t in names))
        assert written == [2, 4, 6, 8] and [files(t) for t in names] == [1] * 8
        log("t0", 1)  # t0's turn has passed; one row does not reach the bound
        tenants.flush_due(5)
        assert files("t0") == 1
        log("t0", 2)
        tenants.flush_due(6)
        assert files("t0") == 2 and sum(files(t) for t in names) == 9
    finally:
        tenants.stop()


# ----------------------------------------------------------------------------- service


@pytest.fixture(scope="module")
def registry_env(
    tmp_path_factory: pytest.TempPathFactory, small_model: bytes, mlflow_template: Path
) -> dict[str, str]:
    """A registry with the main model and the tenant models ``--acme``, ``--beta`` (the small
    model) and ``--slow`` (a model that spins ~0.3 s on a row whose amount is 1.0), each with
    ``champion`` at version 1."""
    from conftest import log_fixture_model
    from test_serving_components import slow_model

    from registry.mlflow_registry import ModelRegistry

    with configured(tmp_path_factory.mktemp("tenant-registry") / "home", mlflow_template) as (settings, _):
        registry = ModelRegistry(settings)
        for onnx, names in (
            (small_model, [BASE, f"{BASE}--acme", f"{BASE}--beta"]),
            (slow_model(settings.dataset, SLOW_STEPS), [f"{BASE}--slow"]),
        ):
            logged = log_fixture_model(settings, onnx, "tenant-fixture")
            for name in names:
                v = registry.register(name, logged.model_uri, logged.run_id, {}, "fixture").version
                registry.move_alias(name, "champion", v, reason="tenant tests")
    return env_reaching(settings)


@pytest.fixture
def make_settings(registry_env: dict[str, str], tmp_path: Path):
    """Settings of a fresh MLOPS_HOME using the shared registry, tenants on."""

    def make(**tenants: str) -> Settings:
        env = registry_env | {
            "MLOPS_HOME": str(tmp_path / "home"),
            "MLOPS__SERVING__LOG_FLUSH_SECONDS": "60",
            "MLOPS__SERVING__TENANTS__ENABLED": "true",
        }
        env |= {f"MLOPS__SERVING__TENANTS__{k.upper()}": v for k, v in tenants.items()}
        return load_settings(environ=env)

    return make


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return feature_records(generate(500, seed=21), load_settings(environ={}).dataset)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def url(tenant: str) -> str:
    return f"/tenants/models/{BASE}--{tenant}/predict"


def test_a_tenant_reaches_only_its_own_models_and_others_look_absent(make_settings, rows):
    """Given tenants acme and beta, acme scores its model (logged under tenant=acme, counted
    under its label); beta's model and a model that does not exist are the same 404 to acme;
    no token is 401, a wrong one 403; a removed tenant is refused within a second; the main
    model's log gets no tenant rows."""
    settings = make_settings()
    acme, beta = add_tenant(settings, "acme"), add_tenant(settings, "beta")

    async def scenario() -> None:
        async with serve_in_process(settings) as (rt, http):
            r = await http.post(
                url("acme"), json={"records": [{"features": f} for f in rows[:5]]}, headers=bearer(acme)
            )
            assert r.status_code == 200, r.text
            answers = r.json()["predictions"]
            assert len(answers) == 5 and all(0.0 <= a["score"] <= 1.0 and a["version"] == 1 for a in answers)
            theirs = await http.post(url("beta"), json={"features": rows[0]}, headers=bearer(acme))
            absent = await http.post(url("nobody"), json={"features": rows[0]}, headers=bearer(acme))
            assert theirs.status_code == absent.status_code == 404
            # the same answer as for a name nobody owns, except for echoing the name sent
            assert theirs.json()["error"].replace("beta", "nobody") == absent.json()["error"]
            base = await http.post(
                f"/tenants/models/{BASE}/predict", json={"features": rows[0]}, headers=bearer(acme)
            )
            assert base.status_code == 404
            assert (await http.post(url("acme"), json={"features": rows[0]})).status_code == 401
            wrong = await http.post(url("acme"), json={"features": rows[0]}, headers=bearer(beta + "x"))
            assert wrong.status_code == 403
            own = await http.post(url("beta"), json={"features": rows[0]}, headers=bearer(beta))
            assert own.status_code == 200
            loaded = {m.name: m for m in rt.tenants.pool.models}
            # the same ONNX file: one session for both tenants, scored in one run when batched
            assert loaded[f"{BASE}--acme"].scorer is loaded[f"{BASE}--beta"].scorer
            assert own.json()["predictions"][0]["score"] == answers[0]["score"]
            metrics = (await http.get("/metrics")).text
            assert 'mlops_serving_tenant_requests_total{status="200",tenant="acme"} 1.0' in metrics
            assert 'mlops_serving_tenant_requests_total{status="404",tenant="acme"} 3.0' in metrics
            assert 'mlops_serving_tenant_requests_total{status="200",tenant="beta"} 1.0' in metrics
            (tenants_dir(settings) / "beta.sha256").unlink()  # beta revoked
            await asyncio.sleep(1.1)
            gone = await http.post(url("beta"), json={"features": rows[0]}, headers=bearer(beta))
            assert gone.status_code == 403

    asyncio.run(scenario())
    import pyarrow.parquet as pq

    acme_log = pq.read_table(tenant_log_dir(settings, "acme") / "predictions").to_pandas()
    assert len(acme_log) == 5 and set(acme_log["model_name"]) == {f"{BASE}--acme"}
    assert len(pq.read_table(tenant_log_dir(settings, "beta") / "predictions")) == 1
    assert not list(predictions_dir(settings).rglob("*.parquet"))


def test_tenants_aliases_are_refreshed_by_one_registry_search(make_settings, rows, small_model: bytes):
    """With ``alias_refresh_seconds`` 0, a moved alias of a tenant's model is answered from
    the new version shortly after the move (the refresh searches every tenant model's alias
    at once), and a removed alias makes the model unknown (404)."""
    from conftest import log_fixture_model

    from registry.mlflow_registry import ModelRegistry
    from serving.source import RegistryAliases

    settings = make_settings(alias_refresh_seconds="0")
    registry = ModelRegistry(settings)
    name = f"{BASE}--gamma"
    logged = log_fixture_model(settings, small_model, "tenant-alias")
    first = registry.register(name, logged.model_uri, logged.run_id, {}, "test").version
    registry.move_alias(name, "champion", first, reason="tenant alias test")
    token = add_tenant(settings, "gamma")
    found = RegistryAliases(settings).resolve_all(f"{BASE}--", "champion")
    assert found[name] == first and found[f"{BASE}--acme"] == 1 and BASE not in found

    async def until(http, want) -> Any:
        for _ in range(100):
            r = await http.post(url("gamma"), json={"features": rows[0]}, headers=bearer(token))
            if want(r):
                return r
            await asyncio.sleep(0.05)
        raise AssertionError(f"still {r.status_code} {r.text[:200]}")

    async def scenario() -> None:
        async with serve_in_process(settings) as (rt, http):
            assert rt.tenants._resolve_all is not None
            r = await http.post(url("gamma"), json={"features": rows[0]}, headers=bearer(token))
            assert r.json()["predictions"][0]["version"] == first
            second = registry.register(name, logged.model_uri, logged.run_id, {}, "test").version
            registry.move_alias(name, "champion", second, reason="tenant alias test")
            await until(
                http, lambda r: r.status_code == 200 and r.json()["predictions"][0]["version"] == second
            )
            registry.client.delete_registered_model_alias(name, "champion")
            await until(http, lambda r: r.status_code == 404)

    asyncio.run(scenario())


def test_a_tenant_labels_only_its_own_requests(make_settings, rows):
    """A tenant posts labels for the request ids its own answers carried (202, then recorded in
    its own feedback partition); another tenant's ids and the main model's ids are refused
    (422), and a request without a tenant token gets 401."""

    settings = make_settings()
    acme, beta = add_tenant(settings, "acme"), add_tenant(settings, "beta")

    async def scenario() -> None:
        async with serve_in_process(settings) as (_, http):
            r = await http.post(url("acme"), json={"features": rows[0]}, headers=bearer(acme))
            rid = r.json()["predictions"][0]["request_id"]
            main = (await http.post("/predict", json={"features": rows[0]})).json()["predictions"][0]
            label = {"request_id": rid, "label": 1}
            other = {"request_id": main["request_id"], "label": 1}
            assert (await http.post("/tenants/feedback", json=label)).status_code == 401
            assert (await http.post("/tenants/feedback", json=label, headers=bearer(beta))).status_code == 422
            assert (await http.post("/tenants/feedback", json=other, headers=bearer(acme))).status_code == 422
            ok = await http.post("/tenants/feedback", json=label, headers=bearer(acme))
            assert ok.status_code == 202 and ok.json() == {"accepted": 1, "unchanged": 0}, ok.text

    asyncio.run(scenario())
    import pyarrow.parquet as pq

    labels = pq.read_table(tenant_log_dir(settings, "acme") / "feedback").to_pandas()
    assert labels["label"].tolist() == [1]
    assert not (tenant_log_dir(settings, "beta") / "feedback").exists()

    async def after_a_restart() -> None:  # the first label is still the tenant's first label
        async with serve_in_process(settings) as (_, http):
            relabel = {"request_id": labels["request_id"][0], "label": 0}
            r = await http.post("/tenants/feedback", json=relabel, headers=bearer(acme))
            assert r.status_code == 409 and "kept" in r.json()["error"], r.text
            same = await http.post("/tenants/feedback", json=relabel | {"label": 1}, headers=bearer(acme))
            assert same.status_code == 202 and same.json() == {"accepted": 0, "unchanged": 1}, same.text

    asyncio.run(after_a_restart())


def test_the_tenant_route_is_absent_unless_tenants_are_enabled(make_settings, rows):
    """With tenants off (the default) the route answers 404 and nothing is loaded for it."""
    settings = make_settings(enabled="false")
    token = add_tenant(settings, "acme")

    async def scenario() -> None:
        async with serve_in_process(settings) as (rt, http):
            assert rt.tenants is None
            r = await http.post(url("acme"), json={"features": rows[0]}, headers=bearer(token))
            assert r.status_code == 404 and "off" in r.json()["error"]

    asyncio.run(scenario())


def test_past_its_quota_a_tenant_gets_429_with_retry_after(make_settings, rows):
    """A tenant allowed 2 requests/s (burst 3) gets 3 answers, then 429 with Retry-After: 1;
    another tenant is not affected."""
    settings = make_settings(rate_per_second="2", burst="3", refusal_delay_ms="0")
    acme, beta = add_tenant(settings, "acme"), add_tenant(settings, "beta")

    async def scenario() -> None:
        async with serve_in_process(settings) as (_, http):
            codes = []
            for _ in range(5):
                r = await http.post(url("acme"), json={"features": rows[0]}, headers=bearer(acme))
                codes.append(r.status_code)
            assert codes == [200, 200, 200, 429, 429]
            assert r.headers["Retry-After"] == "1"
            other = await http.post(url("beta"), json={"features": rows[0]}, headers=bearer(beta))
            assert other.status_code == 200

    asyncio.run(scenario())


class _HeldSession:
    """An ONNX Runtime session whose runs wait until the test releases them (``entered`` is set
    when a run is waiting): a request held in flight for as long as the test needs."""

    def __init__(self, session) -> None:
        self.session = session
        self.entered, self.release = threading.Event(), threading.Event()

    def run(self, *args, **kwargs):
        self.entered.set()
        assert self.release.wait(120), "the held run was never released"
        return self.session.run(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.session, name)


def test_eviction_never_drops_a_request_in_flight(make_settings, rows, small_model: bytes):
    """With room for one model only, a request holding the slow model while a request for
    another model evicts it still gets its answer; the evicted model closes after it."""
    from test_serving_components import slow_model

    schema = load_settings(environ={}).dataset
    sizes = sorted(
        n * MEMORY_FACTOR + MODEL_OVERHEAD_BYTES
        for n in (len(small_model), len(slow_model(schema, SLOW_STEPS)))
    )
    settings = make_settings(model_memory_budget_mb=str((sizes[1] + 0.5 * sizes[0]) / 2**20))
    # The held request waits for the test; the service's request timeout must not end it first.
    serving = settings.serving.model_copy(update={"request_timeout_seconds": 120.0})
    settings = settings.model_copy(update={"serving": serving})
    slow, acme = add_tenant(settings, "slow"), add_tenant(settings, "acme")
    warm = dict(rows[0], amount=0.0)  # answers at once: loads the slow model

    async def scenario() -> None:
        async with serve_in_process(settings) as (rt, http):
            pool = rt.tenants.pool
            r = await http.post(url("slow"), json={"features": warm}, headers=bearer(slow))
            assert r.status_code == 200, r.text
            slow_model_loaded = pool.models[0]
            held = _HeldSession(slow_model_loaded.scorer.session)
            slow_model_loaded.scorer.session = held
            task = asyncio.create_task(http.post(url("slow"), json={"features": warm}, headers=bearer(slow)))
            while not held.entered.is_set():  # the request is in flight, inside the model's run
                assert not task.done(), (await task).text
                await asyncio.sleep(0.005)
            assert slow_model_loaded.refs > 0
            r = await http.post(url("acme"), json={"features": rows[1]}, headers=bearer(acme))
            assert r.status_code == 200, r.text
            assert pool.evictions == 1 and slow_model_loaded.retired and not slow_model_loaded.closed
            assert [m.name for m in pool.models] == [f"{BASE}--acme"]
            assert pool.models[0].nbytes >= MODEL_OVERHEAD_BYTES  # a session costs more than its bytes
            held.release.set()
            answer = await task
            assert answer.status_code == 200, answer.text
            assert answer.json()["predictions"][0]["version"] == 1
            assert slow_model_loaded.closed

    asyncio.run(scenario())


def _p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


QUIET_BOUND_FACTOR = 2.0
QUIET_BOUND_MS = 10.0
WINDOWS = 4
"""The stated bound: with another tenant flooding the service (no pause between requests),
the quiet tenant's p99 stays within ``QUIET_BOUND_FACTOR`` x its p99 alone, measured in the
same run, + ``QUIET_BOUND_MS`` (one process: the flooding clients share the event loop). Alone and
flooded are measured in ``WINDOWS`` alternating windows each."""


def test_an_unpaced_flood_from_one_tenant_keeps_a_quiet_tenants_p99_within_2x_alone(make_settings, rows):
    """Given a quiet tenant at under 40 requests/s (quota 50/s), measured alone and then while 8 clients of
    another tenant send requests back to back with no pause (far past its 50 requests/s
    quota), the quiet tenant's p99 stays within 2x its p99 alone (+10 ms); the quiet tenant is
    never refused and the noisy one mostly is, each refusal held ``refusal_delay_ms``."""
    settings = make_settings(rate_per_second="50", burst="10", max_concurrent="4")
    quiet, noisy = add_tenant(settings, "acme"), add_tenant(settings, "beta")
    body = {"features": rows[0]}

    async def scenario() -> tuple[list[float], list[float], dict[int, int]]:
        async with serve_in_process(settings) as (_, http):
            for tenant, token in (("acme", quiet), ("beta", noisy)):  # both models loaded
                assert (await http.post(url(tenant), json=body, headers=bearer(token))).status_code == 200

            async def quiet_run(n: int) -> list[float]:
                out = []
                for _ in range(n):
                    t = time.perf_counter()
                    r = await http.post(url("acme"), json=body, headers=bearer(quiet))
                    out.append((time.perf_counter() - t) * 1e3)
                    assert r.status_code == 200, r.text
                    await asyncio.sleep(0.025)  # under 40 requests/s: within its own quota
                return out

            codes: dict[int, int] = {}

            async def flood(stop: asyncio.Event) -> None:
                while not stop.is_set():
                    r = await http.post(url("beta"), json=body, headers=bearer(noisy))
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1

            alone: list[float] = []
            loud: list[float] = []
            for _ in range(WINDOWS):  # alternate, so a change in the machine's load hits both
                alone += await quiet_run(160 // WINDOWS)
                stop = asyncio.Event()
                noise = [asyncio.create_task(flood(stop)) for _ in range(8)]
                await asyncio.sleep(0.1)
                try:
                    loud += await quiet_run(160 // WINDOWS)
                finally:
                    stop.set()
                    await asyncio.gather(*noise)
            return alone, loud, codes

    # A p99 of 80 samples is about their maximum: one stall of the shared machine in the flooded
    # windows alone can break the bound. A second measurement is taken only then; a service
    # without fair scheduling fails both by far (the flood starves the quiet tenant for seconds).
    for attempt in (1, 2):
        alone, loud, codes = asyncio.run(scenario())
        bound = QUIET_BOUND_FACTOR * _p99(alone) + QUIET_BOUND_MS
        print(
            f"attempt {attempt}: quiet p99 alone {_p99(alone):.2f} ms, with the flood {_p99(loud):.2f} ms "
            f"(bound {bound:.2f}); noisy {codes}"
        )
        assert codes.get(429, 0) > codes.get(200, 0), codes
        if _p99(loud) <= bound:
            break
    assert _p99(loud) <= bound


@pytest.mark.slow
def test_cli_adds_a_tenant_and_trains_its_own_model(tmp_path: Path, prefect_api: None, rows):
    """`mlops tenants add acme` prints a token once; `mlops train --tenant acme` registers
    'fraud-detector--acme' (v1, challenger) and leaves the main model unregistered."""
    import subprocess

    from conftest import FAST_ENV
    from prefect.settings import PREFECT_API_URL

    from adapters.datasets import write_parquet
    from registry.mlflow_registry import ModelRegistry

    home = tmp_path / "home"
    api = PREFECT_API_URL.value()
    env = (
        os.environ
        | FAST_ENV
        | {"MLOPS_HOME": str(home), "MLOPS__PREFECT__API_URL": api, "PREFECT_API_URL": api}
    )

    def mlops(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(env, *args)

    added = mlops("tenants", "add", "acme")
    assert added.returncode == 0, added.stderr
    token = added.stdout.splitlines()[0].strip()
    assert len(token) >= 40 and token not in (home / "run" / "tenants" / "acme.sha256").read_text()
    again = mlops("tenants", "add", "acme")
    assert again.returncode == 2 and "already exists" in again.stderr + again.stdout
    data = tmp_path / "train.parquet"
    write_parquet([generate(3000, seed=4)], data)
    trained = mlops("train", "--tenant", "acme", "--data", str(data))
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert f"{BASE}--acme" in trained.stdout

    settings = load_settings(
        environ=FAST_ENV | {"MLOPS_HOME": str(home), "MLOPS__SERVING__TENANTS__ENABLED": "true"}
    )
    registry = ModelRegistry(settings)
    assert registry.aliases(f"{BASE}--acme").get("challenger") == 1
    assert not registry.exists(BASE)
