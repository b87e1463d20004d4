"""Callers cannot steer the online service's gates: labels need a token and an id the service
issued (first label kept), forced answers count in no gate, loading a version on demand is
admin-only, and a state that cannot be persisted is not applied.

Each test runs the real service in-process: the Starlette app and ``ServingRuntime`` over a
real MLflow-on-SQLite registry (two registered versions of a small ONNX model), logging to
Parquet that the rollout's own reading code (``PredictionLogStore``, ``observe``,
``measure_step``) reads back, driven through httpx's ASGI transport.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from mlops.datagen import generate
from mlops.predlog import RequestIds, client_request_id
from mlops.rollout.gate import measure_step
from mlops.rollout.observe import observe
from mlops.rollout.plan import ABStep, BlueGreenStep, CanaryStep, ShadowStep, load_plan
from mlops.routing import FORCE_HEADER
from mlops.settings import Settings, load_settings
from serving.auth import (
    feedback_token_path,
    read_feedback_token,
)
from serving.predlog_store import PredictionLogStore
from serving.runtime import ServingRuntime
from tests.support.serving import champion_registry, env_reaching, feature_records, serve_in_process

REPO = Path(__file__).resolve().parent.parent
DEMO_PLAN = REPO / "configs" / "rollout" / "demo.yaml"


@pytest.fixture(scope="module")
def registry_env(
    tmp_path_factory: pytest.TempPathFactory, small_model: bytes, mlflow_template: Path
) -> dict[str, str]:
    """A registry holding versions 1 and 2 (the same small model), champion at 1; the
    ``MLOPS__MLFLOW__*`` settings that point a fresh MLOPS_HOME at it."""
    home = tmp_path_factory.mktemp("registry") / "home"
    metrics = [{"roc_auc": 0.8}, {"roc_auc": 0.81}]
    settings, _, versions = champion_registry(home, mlflow_template, small_model, metrics, "security tests")
    assert versions == [1, 2]
    return env_reaching(settings)


@pytest.fixture
def make_settings(registry_env: dict[str, str], tmp_path: Path):
    """Settings of a fresh MLOPS_HOME (this test's) using the shared registry."""

    def make(**serving: str) -> Settings:
        env = registry_env | {"MLOPS_HOME": str(tmp_path / "home"), "MLOPS__SERVING__LOG_FLUSH_SECONDS": "60"}
        env |= {f"MLOPS__SERVING__{k.upper()}": v for k, v in serving.items()}
        return load_settings(environ=env)

    return make


@pytest.fixture(scope="module")
def traffic() -> tuple[list[dict[str, Any]], np.ndarray]:
    """Feature records and their true labels."""
    frame = generate(16_000, seed=21)
    schema = load_settings(environ={}).dataset
    return feature_records(frame, schema), frame[schema.label_column].to_numpy(dtype=np.int64)


@dataclass
class Served:
    """One service process's worth of state, in this process."""

    settings: Settings
    runtime: ServingRuntime
    http: httpx.AsyncClient

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.runtime.token}"}

    @property
    def labeller(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.runtime.feedback_token}"}

    async def predict(self, records: list[dict[str, Any]], **headers: str) -> list[dict[str, Any]]:
        out = []
        for i in range(0, len(records), 1000):
            body = {"records": records[i : i + 1000]}
            r = await self.http.post("/predict", json=body, headers=headers)
            assert r.status_code == 200, r.text
            out += r.json()["predictions"]
        return out

    async def label(self, ids: list[str], labels: list[int], headers: dict[str, str]) -> httpx.Response:
        body = {"feedback": [{"request_id": i, "label": int(y)} for i, y in zip(ids, labels, strict=True)]}
        return await self.http.post("/feedback", json=body, headers=headers)

    async def label_all(self, ids: list[str], labels: list[int]) -> int:
        """Post labels with the feedback token in batches under the body size limit; how many
        were recorded (every batch must be accepted)."""
        accepted = 0
        for i in range(0, len(ids), 2000):
            r = await self.label(ids[i : i + 2000], labels[i : i + 2000], self.labeller)
            assert r.status_code == 202, r.text
            accepted += r.json()["accepted"]
        return accepted

    async def flush(self) -> None:
        await asyncio.to_thread(self.runtime.writer.flush)


@asynccontextmanager
async def serve(settings: Settings, *, jobs: bool = False) -> AsyncIterator[Served]:
    """``async with serve(settings) as s``: the service in this process (``serve_in_process``)."""
    async with serve_in_process(settings, jobs=jobs) as (rt, http):
        yield Served(settings, rt, http)


def _records(rows: list[dict[str, Any]], start: int, n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"features": rows[i % len(rows)], **extra} for i in range(start, start + n)]


def _tensors(settings: Settings, row: dict[str, Any]) -> list[dict[str, Any]]:
    """One row as OIP v2 input tensors."""
    ds = settings.dataset
    return [
        {
            "name": n,
            "datatype": "FP32" if n in ds.numeric_names else "BYTES",
            "shape": [1, 1],
            "data": [row[n]],
        }
        for n in ds.feature_names
    ]


# ----------------------------------------------------------------------------- feedback


def test_feedback_needs_the_feedback_token_or_the_admin_token(make_settings, traffic):
    """Without credentials /feedback is 401 (naming the token), with a wrong one 403; the
    feedback token (generated 0600 under MLOPS_HOME, read by label pipelines) or the admin
    token records the label."""
    rows, _ = traffic
    settings = make_settings()

    async def scenario() -> None:
        async with serve(settings) as s:
            ids = [p["request_id"] for p in await s.predict(_records(rows, 0, 3))]
            none = await s.label(ids[:1], [1], {})
            assert none.status_code == 401 and "feedback token" in none.json()["error"]
            assert none.headers["www-authenticate"].startswith("Bearer")
            wrong = await s.label(ids[:1], [1], {"Authorization": "Bearer not-the-token-0123456789"})
            assert wrong.status_code == 403
            ok = await s.label(ids[:1], [1], s.labeller)
            assert ok.status_code == 202 and ok.json()["accepted"] == 1
            admin = await s.label(ids[1:2], [0], s.admin)
            assert admin.status_code == 202 and admin.json()["accepted"] == 1
            assert read_feedback_token(settings) == s.runtime.feedback_token != s.runtime.token
            assert stat.S_IMODE(feedback_token_path(settings).stat().st_mode) == 0o600

    asyncio.run(scenario())
    labels = PredictionLogStore.for_settings(settings).read_feedback()
    assert len(labels) == 2


def test_labels_are_taken_only_for_ids_the_service_issued_also_after_a_restart(make_settings, traffic):
    """The id an answer carries is issued by the service (the caller's own id inside it, a
    unique part, a keyed tag): a label for the caller's raw id, a made-up id or one with a
    guessed unique part is a 422 naming the problem, and a batch holding one is recorded
    not at all. Ids issued before a restart still take labels after it; ids of a service
    with another key never do."""
    rows, _ = traffic
    settings = make_settings()

    async def first_life() -> list[str]:
        async with serve(settings) as s:
            answers = await s.predict([{"features": rows[0], "request_id": "order-7"}, *_records(rows, 1, 2)])
            ids = [a["request_id"] for a in answers]
            assert ids[0].startswith("order-7.") and client_request_id(ids[0]) == "order-7"
            assert len(set(ids)) == 3 and client_request_id(ids[1]) is None
            again = (await s.predict([{"features": rows[0], "request_id": "order-7"}]))[0]["request_id"]
            assert again != ids[0]  # reusing someone's id never yields their answer's id
            body, _, tag = ids[1].rpartition(".")
            guessed = body[:-1] + ("0" if body[-1] != "0" else "1") + "." + tag
            for bad in ("order-7", "made-up", guessed, ids[1] + "0"):
                r = await s.label([bad], [1], s.labeller)
                assert r.status_code == 422 and "did not issue" in r.json()["error"], (bad, r.text)
            mixed = await s.label([ids[1], "made-up"], [1, 1], s.labeller)
            assert mixed.status_code == 422 and "nothing was recorded" in mixed.json()["error"]
            assert (await s.label([ids[0]], [1], s.labeller)).status_code == 202
            return ids

    ids = asyncio.run(first_life())
    assert PredictionLogStore.for_settings(settings).read_feedback()["request_id"].tolist() == [ids[0]]

    async def second_life() -> None:
        async with serve(settings) as s:
            r = await s.label([ids[1], ids[2]], [0, 1], s.labeller)
            assert r.status_code == 202 and r.json()["accepted"] == 2

    asyncio.run(second_life())
    other = RequestIds(os.urandom(32))
    assert not other.verify(ids[0]) and other.verify(other.issue("order-7"))


def test_a_request_keeps_its_first_label_and_a_conflicting_batch_records_nothing(make_settings, traffic):
    """The first label of a request is kept: the same label again is accepted as unchanged
    (a retried batch succeeds), a different one is a 409 naming the request, and a batch
    with one conflict records none of its labels. After a restart the service still knows
    which requests are labelled, and the log's readers use the first label."""
    rows, _ = traffic
    settings = make_settings()

    async def first_life() -> list[str]:
        async with serve(settings) as s:
            ids = [p["request_id"] for p in await s.predict(_records(rows, 0, 3))]
            r = await s.label([ids[0]], [1], s.labeller)
            assert r.status_code == 202 and r.json() == {"accepted": 1, "unchanged": 0}
            r = await s.label([ids[0]], [1], s.labeller)
            assert r.status_code == 202 and r.json() == {"accepted": 0, "unchanged": 1}
            r = await s.label([ids[0]], [0], s.labeller)
            assert r.status_code == 409 and ids[0][:20] in r.json()["error"] and "kept" in r.json()["error"]
            r = await s.label([ids[1], ids[0]], [1, 0], s.labeller)
            assert r.status_code == 409 and "nothing was recorded" in r.json()["error"]
            r = await s.label([ids[1], ids[1]], [0, 1], s.labeller)  # a conflict within one batch
            assert r.status_code == 409
            r = await s.label([ids[1]], [0], s.labeller)  # ids[1] was never recorded above
            assert r.status_code == 202 and r.json()["accepted"] == 1
            return ids

    ids = asyncio.run(first_life())

    async def second_life() -> None:
        async with serve(settings) as s:
            assert (await s.label([ids[0]], [0], s.labeller)).status_code == 409
            assert (await s.label([ids[2]], [1], s.labeller)).status_code == 202

    asyncio.run(second_life())
    store = PredictionLogStore.for_settings(settings)
    labelled = store.query("SELECT request_id, label FROM labelled").set_index("request_id")["label"]
    assert labelled[ids[0]] == 1 and labelled[ids[1]] == 0 and labelled[ids[2]] == 1
    assert len(store.read_feedback()) == 3


def test_first_labels_are_kept_on_disk_and_memory_holds_only_unflushed_ones(make_settings, traffic):
    """3,000 labelled requests: until the log flushes they are held in memory (the writer's
    buffer bounds them), after it only in the on-disk index, which still refuses a relabel."""
    rows, y = traffic
    settings = make_settings()

    async def scenario() -> None:
        async with serve(settings) as s:
            ids = [p["request_id"] for p in await s.predict(_records(rows, 0, 3000))]
            assert await s.label_all(ids, list(y[:3000])) == 3000
            index = s.runtime.first_labels
            assert len(index.pending["main"]) == 3000 and index.count("main") == 0
            await s.flush()
            assert index.pending["main"] == {} and index.count("main") == 3000
            r = await s.label([ids[7]], [1 - int(y[7])], s.labeller)
            assert r.status_code == 409 and "kept" in r.json()["error"]
            assert (await s.label([ids[7]], [int(y[7])], s.labeller)).json() == {
                "accepted": 0,
                "unchanged": 1,
            }

    asyncio.run(scenario())


def test_the_first_label_index_never_claims_a_label_the_log_lost_and_catches_up_with_the_log(
    tmp_path: Path,
) -> None:
    """The index records a label once its feedback file is written; a label written to the log
    but not indexed (a crash in between) is caught up at the next start; a label accepted but
    never written (lost in a crash) may be sent again; a lost index is rebuilt from the log."""
    from serving.first_labels import FirstLabels
    from serving.predlog_writer import PredictionLogWriter

    schema = load_settings(environ={}).dataset
    store = PredictionLogStore(tmp_path / "predictions", tmp_path / "feedback", schema)
    path = tmp_path / "run" / "first-labels.sqlite"

    def reader(since):
        return store.read_feedback(since)

    index = FirstLabels(path)
    index.catch_up("main", reader)
    writer = PredictionLogWriter(
        tmp_path / "predictions", tmp_path / "feedback", schema, on_feedback=partial(index.written, "main")
    )
    now = datetime.now(UTC).timestamp()
    writer.feedback([("a", 1), ("b", 0)], now)
    index.accept("main", {"a": 1, "b": 0})
    writer.flush()
    assert index.count("main") == 2 and index.pending["main"] == {}
    # a crash between the file and the index: written by a writer that does not tell the index
    unindexed = PredictionLogWriter(tmp_path / "predictions", tmp_path / "feedback", schema)
    unindexed.feedback([("c", 1)], now + 1)
    unindexed.flush()
    # a label accepted into the buffer, never written: the process dies here
    index.accept("main", {"d": 1})
    index.close()

    restarted = FirstLabels(path)
    assert restarted.catch_up("main", reader) >= 1
    assert restarted.known("main", ["a", "b", "c", "d"]) == {"a": 1, "b": 0, "c": 1}
    restarted.close()

    path.unlink()
    rebuilt = FirstLabels(path)
    assert rebuilt.catch_up("main", reader) == 3
    assert rebuilt.known("main", ["a", "b", "c"]) == {"a": 1, "b": 0, "c": 1}
    assert rebuilt.known("tenant:acme", ["a"]) == {}  # scopes are apart


# ----------------------------------------------------------------------------- forced variants


def _outcomes(settings: Settings, since: datetime, *, drop_forced: bool = False):
    """Every gate of the demo plan's traffic steps over the log since ``since``, as the
    rollout flow reads it; (observations, [(check, outcome, candidate value)])."""
    store = PredictionLogStore.for_settings(settings)
    log = store.read_log(since=since)
    if drop_forced:  # how the log reads when nothing tells forced rows apart
        log = log.drop(columns="forced")
    plan = load_plan(DEMO_PLAN)
    ab = next(s for s in plan.steps if isinstance(s, ABStep))
    obs = observe(
        log,
        store.read_feedback(since=since),
        stable_version=1,
        candidate_version=2,
        ab_metric=ab.primary.metric,
    )
    out = []
    for step in plan.steps:
        if isinstance(step, ShadowStep | CanaryStep | ABStep | BlueGreenStep):
            out += [(m.key, m.outcome, m.candidate) for m in measure_step(step, obs)]
    return obs, out


def test_forcing_10000_requests_onto_the_candidate_with_wrong_labels_changes_no_gate(make_settings, traffic):
    """A caller who forces 10,000 requests onto the candidate (x-mlops-variant, and the
    version's own OIP endpoint) and labels every one of them wrongly, even holding a label
    token, changes no gate outcome and no A/B arm: those answers are logged as forced and
    the rollout's observation code leaves them out (counted in ``forced``). Read as if they
    were routed, the same log would fail the candidate."""
    rows, truth = traffic
    settings = make_settings()
    since = datetime.now(UTC) - timedelta(seconds=1)
    n_forced = 10_000

    async def scenario() -> None:
        async with serve(settings) as s:
            state = {
                "mode": "ab",
                "weight_pct": 50,
                "salt": "exp-1",
                "stable_version": 1,
                "candidate_version": 2,
            }
            assert (await s.http.put("/admin/state", json=state, headers=s.admin)).status_code == 200
            routed = [{"features": rows[i], "entity_key": f"user-{i % 5000}"} for i in range(len(rows))]
            answers = await s.predict(routed)
            assert {a["variant"] for a in answers} == {"stable", "candidate"}
            ids = [a["request_id"] for a in answers]
            assert await s.label_all(ids, truth.tolist()) == len(ids)
            await s.flush()
            before[:] = _outcomes(settings, since)[1]

            # The attack: forced answers, every one labelled wrongly.
            forced = await s.predict(_records(rows, 0, n_forced - 50), **{FORCE_HEADER: "candidate"})
            assert {a["variant"] for a in forced} == {"candidate"}
            name = settings.training.model_name
            for j in range(50):
                body = {"inputs": _tensors(settings, rows[j])}
                r = await s.http.post(f"/v2/models/{name}/versions/2/infer", json=body)
                assert r.status_code == 200, r.text
                forced.append({"request_id": r.json()["parameters"]["request_ids"][0]})
            wrong = [1 - int(truth[i % len(truth)]) for i in range(n_forced)]
            assert await s.label_all([a["request_id"] for a in forced], wrong) == n_forced
            relabel = await s.label(ids[:100], [1 - int(y) for y in truth[:100]], s.labeller)
            assert relabel.status_code == 409  # the routed answers keep their first label
            await s.flush()

    before: list = []
    asyncio.run(scenario())
    obs, after = _outcomes(settings, since)
    assert obs.forced == n_forced
    assert obs.candidate.requests + obs.stable.requests == len(rows)
    assert after == before
    counted, as_routed = _outcomes(settings, since, drop_forced=True)
    decided = {k for k, o, _ in after if o.value != "INCONCLUSIVE"}
    assert {"auc_vs_stable_diff", "auc", "ab_log_loss", "sample_ratio"} <= decided, after  # with evidence
    assert counted.candidate.auc < obs.candidate.auc - 0.2
    failed = {k for k, o, _ in as_routed if o.value == "FAIL"} - {
        k for k, o, _ in before if o.value == "FAIL"
    }
    assert {"auc_vs_stable_diff", "auc", "ab_log_loss", "sample_ratio"} <= failed, as_routed


# ----------------------------------------------------------------------------- load on demand


def test_loading_a_version_on_demand_is_off_by_default_and_admin_only_when_on(make_settings, traffic):
    """By default a version that is not loaded answers 404 on its OIP endpoint, even to the
    admin, and nothing is loaded or evicted. With ``load_on_demand`` on, a caller without
    the admin token gets 401/403 and still loads nothing; the admin token loads it."""
    rows, _ = traffic
    url = "/v2/models/{name}/versions/2/infer"

    async def scenario(settings: Settings, on: bool) -> None:
        name = settings.training.model_name
        body = {"inputs": _tensors(settings, rows[0])}
        async with serve(settings) as s:
            path = url.format(name=name)
            for headers in ({}, {"Authorization": "Bearer not-the-token-0123456789"}, s.labeller):
                r = await s.http.post(path, json=body, headers=headers)
                assert r.status_code == (404 if not on else 401 if not headers else 403), r.text
                assert [m.version for m in s.runtime.pool.models] == [1]
            r = await s.http.post(path, json=body, headers=s.admin)
            if not on:
                assert r.status_code == 404 and "off" in r.json()["error"]
                assert [m.version for m in s.runtime.pool.models] == [1]
            else:
                assert r.status_code == 200 and r.json()["model_version"] == "2"
                assert sorted(m.version for m in s.runtime.pool.models) == [1, 2]

    default = make_settings()
    assert default.serving.load_on_demand is False
    asyncio.run(scenario(default, on=False))
    asyncio.run(scenario(make_settings(load_on_demand="true"), on=True))


# ----------------------------------------------------------------------------- persisted state


def test_a_state_that_cannot_be_persisted_is_not_applied(make_settings):
    """When the state file cannot be written (a file stands where its folder should be),
    the admin call fails with a 500 naming the file, and the service keeps serving the old
    state: memory and disk agree. Once the folder is back, the same call applies the state
    (changed, not "unchanged"), and a restart restores it."""
    settings = make_settings()
    canary = {"mode": "canary", "weight_pct": 10, "salt": "r1", "stable_version": 1, "candidate_version": 2}
    run = settings.run_dir
    aside = run.with_name("run-aside")

    async def first_life() -> None:
        async with serve(settings) as s:
            before = (await s.http.get("/admin/state", headers=s.admin)).json()
            run.rename(aside)
            run.write_text("not a folder")
            try:
                r = await s.http.put("/admin/state", json=canary, headers=s.admin)
                assert r.status_code == 500 and "serving-state.json" in r.json()["error"], r.text
                now = (await s.http.get("/admin/state", headers=s.admin)).json()
                assert (now["mode"], now["candidate_version"], now["generation"]) == (
                    before["mode"],
                    before["candidate_version"],
                    before["generation"],
                )
                answer = await s.http.post("/predict", json={"features": traffic_row}, headers={})
                assert answer.json()["predictions"][0]["variant"] == "stable"
            finally:
                run.unlink()
                aside.rename(run)
            r = await s.http.put("/admin/state", json=canary, headers=s.admin)
            assert r.status_code == 200 and r.json()["changed"] is True and r.json()["mode"] == "canary"

    traffic_row = {
        n: (float(v) if n in settings.dataset.numeric_names else str(v))
        for n, v in generate(1, seed=3)[list(settings.dataset.feature_names)].iloc[0].items()
    }
    asyncio.run(first_life())

    async def second_life() -> None:
        async with serve(settings) as s:
            state = (await s.http.get("/admin/state", headers=s.admin)).json()
            assert (state["mode"], state["weight_pct"], state["candidate_version"]) == ("canary", 10.0, 2)

    asyncio.run(second_life())


def test_prediction_logs_written_before_the_forced_column_read_it_as_null(tmp_path: Path):
    """Files from before the ``forced`` column read back with it null, so old logs still load
    (and count as routed)."""
    import pyarrow.parquet as pq

    from mlops.predlog import part_name
    from serving.predlog_writer import LogRow, PredictionLogWriter

    schema = load_settings(environ={}).dataset
    writer = PredictionLogWriter(tmp_path / "p", tmp_path / "f", schema, flush_seconds=60)
    feats = {n: 1.0 for n in schema.numeric_names} | {n: "x" for n in schema.categorical_names}
    now = pd.Timestamp.now(tz="UTC").timestamp()
    writer.log(
        LogRow("a", now, "u", "stable", "primary", "single", "m", 1, 0.2, False, 1.0, 200, None, feats)
    )
    writer.flush()
    [path] = (tmp_path / "p").glob("date=*/*.parquet")
    old = pq.read_table(path).drop(["forced"])
    path.unlink()
    pq.write_table(old, path.with_name(part_name(pd.Timestamp.now(tz="UTC").to_pydatetime(), 1, 1)))
    log = PredictionLogStore(tmp_path / "p", tmp_path / "f", schema).read_log()
    assert log["request_id"].tolist() == ["a"] and log["forced"].isna().all()
    obs = observe(log, stable_version=1, candidate_version=None)
    assert obs.stable.requests == 1 and obs.forced == 0


@pytest.fixture(autouse=True)
def _no_leaked_env() -> Iterator[None]:
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
