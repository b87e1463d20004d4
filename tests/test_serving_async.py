"""Async inference: the durable job queue on its own (real SQLite files), then the real
BentoML service on a loopback port: 1,000 jobs across a SIGKILL, a full queue, expiry,
callbacks and malformed bodies.

The service tests share one MLflow registry (versions registered once for the module) and
each start their own service with its own MLOPS_HOME, so each sees only its own jobs and
prediction log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from test_serving_service import REPO

from adapters.services import free_port, terminate
from mlops.datagen import generate
from mlops.predlog import client_request_id
from mlops.request_validation import InvalidRequest
from mlops.settings import AsyncJobsConfig, Settings, load_settings
from serving.async_jobs import (
    DONE,
    EXPIRED,
    FAILED,
    QUEUED,
    RUNNING,
    JobStore,
    QueueFull,
    check_callback,
    job_key,
    view,
)
from serving.predlog_store import PredictionLogStore
from tests.support.serving import champion_registry

LOOPBACK = ("127.0.0.1", "localhost", "::1")


# ----------------------------------------------------------------------------- the store


def _payload(i: int) -> dict:
    return {"records": [{"features": {"amount": float(i)}, "request_id": f"job-{i}", "entity_key": None}]}


def test_callback_urls_outside_the_allow_list_are_refused():
    """Only http(s) URLs whose host is exactly an allow-listed name or canonical IP pass;
    look-alike hosts, credentials, other schemes and odd IP spellings are 400s."""
    for ok in (
        "http://127.0.0.1:8080/hook",
        "https://localhost/x?y=1",
        "http://[::1]:9/cb",
        "http://LOCALHOST/",
    ):
        assert check_callback(ok, LOOPBACK) == ok
    refused = [
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.1/",
        "http://127.0.0.1.evil.example/",
        "http://evil.example/#@127.0.0.1",
        "http://user:pw@127.0.0.1/",
        "http://127.0.0.1@evil.example/",
        "http://2130706433/",  # 127.0.0.1 as one number
        "http://0x7f.0.0.1/",
        "http://127.1/",
        "ftp://127.0.0.1/",
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_",
        "http:///nohost",
        "http://127.0.0.1:99999/",
        "http://127.0.0.1/ space",
        "",
        "x" * 3000,
    ]
    for bad in refused:
        with pytest.raises(InvalidRequest) as exc:
            check_callback(bad, LOOPBACK)
        assert exc.value.status == 400, bad
    with pytest.raises(InvalidRequest):
        check_callback(["http://127.0.0.1/"], LOOPBACK)
    with pytest.raises(InvalidRequest, match="not allowed"):
        check_callback("http://127.0.0.1/", ())  # an empty allow-list refuses every callback


def test_a_job_running_at_a_crash_is_queued_again_with_the_same_request_ids(tmp_path: Path):
    """Given jobs committed to the store and one claimed (running) when the process dies,
    when the store is reopened and recovered, then every job is still there, the running
    one is queued again with its payload (same request ids) and its attempt counted."""
    cfg = AsyncJobsConfig()
    path = tmp_path / "jobs.db"
    store = JobStore(path)
    for i in range(3):
        store.submit(f"k{i}", _payload(i), None, None, 100.0, cfg)
    running = store.claim(101.0, cfg.max_attempts, cfg.ttl_seconds)
    assert running is not None and running.key == "k0" and running.attempts == 1
    store.finish("k1", DONE, 102.0, cfg.ttl_seconds, result={"predictions": []})
    # no close(): the process is gone; a second connection sees what was committed
    reopened = JobStore(path)
    assert reopened.counts() == {RUNNING: 1, QUEUED: 1, DONE: 1}
    assert reopened.recover(200.0) == 1
    again = reopened.claim(201.0, cfg.max_attempts, cfg.ttl_seconds)
    assert again is not None and again.key == "k0" and again.attempts == 2
    assert again.payload == _payload(0)
    assert reopened.claim(201.0, cfg.max_attempts, cfg.ttl_seconds).key == "k2"
    assert reopened.claim(201.0, cfg.max_attempts, cfg.ttl_seconds) is None  # k1 is done: not rescored


def test_a_job_interrupted_max_attempts_times_fails_with_a_reason(tmp_path: Path):
    """A job whose scoring keeps crashing the process fails after max_attempts tries instead
    of being retried for ever."""
    cfg = AsyncJobsConfig(max_attempts=2)
    path = tmp_path / "jobs.db"
    JobStore(path).submit("poison", _payload(0), None, None, 0.0, cfg)
    for attempt in (1, 2):
        store = JobStore(path)
        store.recover(float(attempt))
        assert store.claim(float(attempt), cfg.max_attempts, cfg.ttl_seconds).attempts == attempt
    store = JobStore(path)
    store.recover(3.0)
    assert store.claim(3.0, cfg.max_attempts, cfg.ttl_seconds) is None
    job = store.get("poison")
    assert job.state == FAILED and job.status == 500 and "interrupted 2 times" in job.error


def test_a_job_put_back_for_lack_of_a_model_does_not_hold_up_the_queue(tmp_path: Path):
    """A job released because its slot holds no model (503) waits until its retry time
    without counting an attempt, and the jobs behind it are claimed meanwhile."""
    cfg = AsyncJobsConfig()
    store = JobStore(tmp_path / "jobs.db")
    store.submit("forced-candidate", _payload(0), "candidate", None, 0.0, cfg)
    store.submit("next", _payload(1), None, None, 0.0, cfg)
    head = store.claim(1.0, cfg.max_attempts, cfg.ttl_seconds)
    assert head.key == "forced-candidate" and head.forced == "candidate"
    store.release(head.key, 1.0, 1.5)
    assert store.claim(1.1, cfg.max_attempts, cfg.ttl_seconds).key == "next"
    assert store.claim(1.2, cfg.max_attempts, cfg.ttl_seconds) is None
    again = store.claim(1.5, cfg.max_attempts, cfg.ttl_seconds)
    assert again.key == "forced-candidate" and again.attempts == 1


def test_the_queue_is_bounded_and_jobs_expire_then_disappear(tmp_path: Path):
    """max_pending queued/running jobs fill the queue (QueueFull, a 429); finishing one makes
    room. Past its TTL a job reads as expired with its payload and result deleted; a TTL
    later the row is gone."""
    cfg = AsyncJobsConfig(max_pending=2, ttl_seconds=10.0)
    store = JobStore(tmp_path / "jobs.db")
    store.submit("a", _payload(1), None, None, 0.0, cfg)
    store.submit("b", _payload(2), None, None, 0.0, cfg)
    with pytest.raises(QueueFull) as exc:
        store.submit("c", _payload(3), None, None, 0.0, cfg)
    assert exc.value.status == 429 and "max_pending 2" in str(exc.value)
    store.claim(1.0, cfg.max_attempts, cfg.ttl_seconds)
    store.finish("a", DONE, 2.0, cfg.ttl_seconds, result={"predictions": [{"score": 0.5}]})
    store.submit("c", _payload(3), None, None, 3.0, cfg)
    with pytest.raises(QueueFull, match="max_stored 3"):
        JobStore(tmp_path / "jobs.db").submit(
            "d", _payload(4), None, None, 3.0, cfg.model_copy(update={"max_pending": 9, "max_stored": 3})
        )

    status, body = view("id", store.get("a"), 5.0)
    assert status == 200 and body["state"] == DONE and body["result"]["predictions"][0]["score"] == 0.5
    assert view("id", store.get("a"), 12.0)[0] == 410  # past the TTL, even before a sweep
    assert store.sweep(12.5, cfg.ttl_seconds) == (2, 0)  # a (done at 2) and b (queued at 0)
    a = store.get("a")
    assert a.state == EXPIRED and a.result is None and a.payload is None
    status, body = view("id", a, 12.5)
    assert status == 410 and body["state"] == EXPIRED and "result" not in body
    assert store.claim(12.5, cfg.max_attempts, cfg.ttl_seconds).key == "c"  # b expired unscored
    assert store.sweep(22.5, cfg.ttl_seconds) == (0, 2)
    assert store.get("a") is None and store.get("b") is None


def test_job_ids_are_random_and_not_stored():
    """Job ids are distinct 128-bit tokens; the store and the prediction log only see a hash."""
    import secrets

    ids = {secrets.token_urlsafe(16) for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 22 for i in ids)
    key = job_key("abc")
    assert len(key) == 32 and "abc" not in key


# ----------------------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def registry(
    tmp_path_factory: pytest.TempPathFactory, small_model: bytes, mlflow_template: Path
) -> dict[str, str]:
    """A registry with champion v1 (the small model); the env that points a service at it."""
    home = tmp_path_factory.mktemp("async") / "registry"
    settings, env, _ = champion_registry(
        home, mlflow_template, small_model, [{"roc_auc": 0.8}], "async tests"
    )
    return env | {
        "MLOPS__MLFLOW__TRACKING_URI": settings.tracking_uri,
        "MLOPS__MLFLOW__AUDIT_DB_URI": settings.audit_db_uri,
        "MLOPS__MLFLOW__ARTIFACT_LOCATION": settings.artifact_location,
    }


@dataclass
class Svc:
    url: str
    env: dict[str, str]
    settings: Settings
    proc: subprocess.Popen
    log: Path
    port: int

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)


def _spawn(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    import sys

    argv = [str(Path(sys.executable).with_name("bentoml")), "serve", "serving.service:ScoringService"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--working-dir", str(REPO)]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:  # live, not ready: a service without a model still queues jobs
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"service not live after 240 s: {log.read_text()[-2000:]}")


@pytest.fixture
def start(registry: dict[str, str], tmp_path: Path) -> Iterator:
    """Start a service with its own MLOPS_HOME and the given overrides (stopped after the test)."""
    started: list[Svc] = []

    def run(overrides: dict[str, str]) -> Svc:
        env = registry | {"MLOPS_HOME": str(tmp_path / "home"), "MLOPS__SERVING__LOG_FLUSH_SECONDS": "0.1"}
        env |= overrides
        settings = load_settings(environ=env)
        settings.home_path.mkdir(parents=True, exist_ok=True)
        port = started[-1].port if started else free_port()
        log = tmp_path / "service.log"
        svc = Svc(f"http://127.0.0.1:{port}", env, settings, _spawn(env, port, log), log, port)
        started.append(svc)
        return svc

    yield run
    for svc in started:
        terminate(svc.proc)


def _rows(settings: Settings, n: int) -> list[dict]:
    frame = generate(n, seed=5)
    ds = settings.dataset
    return [
        {f: (float(r[f]) if f in ds.numeric_names else str(r[f])) for f in ds.feature_names}
        for r in frame.to_dict("records")
    ]


def _wait_all(http: httpx.Client, ids: list[str], timeout: float) -> dict[str, dict]:
    """Poll until every job is done, failed or expired; their last status bodies."""
    final: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(final) < len(ids) and time.monotonic() < deadline:
        for job_id in ids:
            if job_id not in final:
                body = http.get(f"/predict/async/{job_id}").json()
                if body["state"] in (DONE, FAILED, EXPIRED):
                    final[job_id] = body
        if len(final) < len(ids):
            time.sleep(0.3)
    missing = Counter(http.get(f"/predict/async/{j}").json()["state"] for j in ids if j not in final)
    assert not missing, f"jobs not finished in {timeout} s: {dict(missing)}"
    return final


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_1000_jobs_across_a_sigkill_all_finish_none_lost_none_scored_twice(start):
    """Given 1,000 async jobs, the service SIGKILLed while it works through them and started
    again: every accepted job ends done (with the answer /predict gives for its record) or
    failed with a reason; none is lost; in the prediction log no request id appears twice
    unless its job was running at the kill (attempts 2, same request id: deduped by id)."""
    # no model at first: the jobs queue up; then one is loaded and the kill comes mid-way
    svc = start({"MLOPS__SERVING__STABLE_ALIAS": "no-such-alias", "MLOPS__SERVING__ASYNC_JOBS__WORKERS": "2"})
    rows = _rows(svc.settings, 1000)
    ids: list[str] = []
    http = svc.http()
    t0 = time.monotonic()
    for i in range(600):
        resp = http.post("/predict/async", json={"features": rows[i], "entity_key": f"user-{i}"})
        assert resp.status_code == 202, resp.text
        assert resp.headers["location"] == f"/predict/async/{resp.json()['job_id']}"
        ids.append(resp.json()["job_id"])
    submit_s = time.monotonic() - t0
    token = (svc.settings.run_dir / "serving.token").read_text().strip()
    resp = http.post(
        "/admin/slots/stable", json={"alias": "champion"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert resp.status_code == 200, resp.text
    while http.get(f"/predict/async/{ids[30]}").json()["state"] != DONE:
        time.sleep(0.01)
    os.killpg(svc.proc.pid, signal.SIGKILL)
    svc.proc.wait()
    killed_at = time.time()
    http.close()

    svc = start({"MLOPS__SERVING__ASYNC_JOBS__WORKERS": "2"})
    http = svc.http()
    for i in range(600, 1000):
        resp = http.post("/predict/async", json={"features": rows[i], "entity_key": f"user-{i}"})
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["job_id"])
    final = _wait_all(http, ids, timeout=600)
    by_state = Counter(b["state"] for b in final.values())
    assert by_state[DONE] + by_state[FAILED] == 1000, dict(by_state)
    after = [j for j in ids[:600] if datetime.fromisoformat(final[j]["updated_at"]).timestamp() > killed_at]
    assert after, "every job submitted before the kill had finished: the kill was not mid-way"
    assert all(b["error"] for b in final.values() if b["state"] == FAILED)

    # the answer is /predict's for the same record (same model, same score)
    for i in (0, 599, 600, 999):
        body = final[ids[i]]
        if body["state"] != DONE:
            continue
        [pred] = body["result"]["predictions"]
        direct = http.post("/predict", json={"features": rows[i], "entity_key": f"user-{i}"}).json()
        assert pred["score"] == pytest.approx(direct["predictions"][0]["score"], rel=1e-6)
        assert pred["model_version"] == direct["predictions"][0]["model_version"]
        assert pred["request_id"].startswith("job-") and body["result"]["mode"] == "single"
    http.close()
    terminate(svc.proc)  # flushes the prediction log

    logged = PredictionLogStore.for_settings(svc.settings).query(
        "SELECT request_id FROM predictions WHERE request_id LIKE 'job-%'"
    )
    # Each scoring issues a fresh id; the job's own part (``job-<key>``) is what repeats.
    counts = Counter(client_request_id(r) for r in logged["request_id"])
    rid = {
        j: client_request_id(final[j]["result"]["predictions"][0]["request_id"])
        for j in ids
        if final[j]["state"] == DONE
    }
    retried = {j for j in ids if final[j]["attempts"] > 1}
    twice = [j for j, r in rid.items() if counts.get(r, 0) > 1]
    assert set(twice) <= retried, "a job scored once appears twice in the prediction log"
    assert len(retried) <= 2  # at most one running job per worker at the kill
    assert all(counts.get(r, 0) <= final[j]["attempts"] for j, r in rid.items())
    # everything scored after the restart is logged exactly once (the first life may lose
    # its last unflushed log batch to the SIGKILL, as /predict does)
    assert all(counts.get(rid[j], 0) == 1 for j in ids[600:] if j in rid and j not in retried)
    print(
        f"\n1000 async jobs: 600 submitted in {submit_s:.2f} s, {600 - len(after)} finished before "
        f"the kill, {len(after)} after the restart; in the end {dict(by_state)}; "
        f"{len(retried)} re-run after the kill; {len(twice)} logged twice (same job id)"
    )


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[tuple[str, list[dict]]]:
    """A tiny HTTP server on loopback that records the callbacks it receives."""
    _Hook.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/done?ref=42", _Hook.received
    server.shutdown()
    server.server_close()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_full_queue_429_callbacks_expiry_and_malformed_bodies(start, hook):
    """With no model loaded jobs wait: the 4th job past max_pending 3 gets 429. Loading a
    model lets them finish; the one with a loopback callback is POSTed its result. A
    callback to any other host, and malformed bodies, are 4xx at submit. Past the TTL a job
    reads as expired (410), a TTL later it is unknown (404), as is a made-up id."""
    url, received = hook
    svc = start(
        {
            "MLOPS__SERVING__STABLE_ALIAS": "no-such-alias",  # start with nothing to score with
            "MLOPS__SERVING__RESTORE_STATE": "false",
            "MLOPS__SERVING__ASYNC_JOBS__MAX_PENDING": "3",
            "MLOPS__SERVING__ASYNC_JOBS__TTL_SECONDS": "4",
            "MLOPS__SERVING__ASYNC_JOBS__SWEEP_SECONDS": "0.2",
        }
    )
    rows = _rows(svc.settings, 5)
    http = svc.http()

    bad = [
        (b"{not json", 400, "JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (json.dumps({"records": []}).encode(), None, "empty"),
        (json.dumps({"features": {"nope": 1}}).encode(), None, ""),
        (json.dumps({"features": rows[0], "extra": 1}).encode(), None, "extra"),
        (json.dumps({"features": rows[0], "callback_url": 5}).encode(), 400, "callback_url"),
        (
            json.dumps({"features": rows[0], "callback_url": "http://169.254.169.254/x"}).encode(),
            400,
            "not allowed",
        ),
        (
            json.dumps({"features": rows[0], "callback_url": "http://10.1.2.3:80/x"}).encode(),
            400,
            "not allowed",
        ),
        (json.dumps({"features": rows[0], "callback_url": "file:///etc/passwd"}).encode(), 400, "http"),
        (b"{" + b" " * 2_000_000 + b"}", 413, "exceeds"),
    ]
    for body, status, words in bad:  # status None: the 4xx /predict gives for the same body
        resp = http.post("/predict/async", content=body, headers={"content-type": "application/json"})
        assert 400 <= resp.status_code < 500 and words in resp.json()["error"], (body[:80], resp.text)
        assert status is None or resp.status_code == status, (body[:80], resp.text)
    resp = http.post("/predict/async", json={"features": rows[0]}, headers={"X-Mlops-Variant": "other"})
    assert resp.status_code == 400 and "stable" in resp.json()["error"]
    assert http.get("/predict/async/not-a-job").status_code == 404
    assert http.get("/predict/async/AAAAAAAAAAAAAAAAAAAAAA").status_code == 404

    first = http.post("/predict/async", json={"features": rows[0], "callback_url": url})
    others = [http.post("/predict/async", json={"records": [{"features": r} for r in rows[1:3]]})]
    others.append(http.post("/predict/async", json={"features": rows[3], "request_id": "mine-3"}))
    assert [r.status_code for r in (first, *others)] == [202, 202, 202]
    full = http.post("/predict/async", json={"features": rows[4]})
    assert full.status_code == 429 and "max_pending 3" in full.json()["error"]
    assert full.headers["retry-after"] == "1"
    for _ in range(4):  # no model yet: every job waits, unclaimed (never running, never failed)
        time.sleep(0.3)
        for r in (first, *others):
            job = http.get(f"/predict/async/{r.json()['job_id']}").json()
            assert (job["state"], job["attempts"]) == (QUEUED, 0), job
    assert http.get(f"/predict/async/{first.json()['job_id']}").json()["callback"] == "waiting"

    admin = httpx.Client(base_url=svc.url, timeout=60)
    token = (svc.settings.run_dir / "serving.token").read_text().strip()
    resp = admin.post(
        "/admin/slots/stable", json={"alias": "champion"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert resp.status_code == 200, resp.text
    ids = [first.json()["job_id"], *(r.json()["job_id"] for r in others)]
    final = _wait_all(http, ids, timeout=60)
    assert all(b["state"] == DONE for b in final.values()), final
    assert len(final[ids[1]]["result"]["predictions"]) == 2
    assert client_request_id(final[ids[2]]["result"]["predictions"][0]["request_id"]) == "mine-3"

    deadline = time.monotonic() + 20
    while not received and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(received) == 1
    [cb] = received
    assert cb["job_id"] == ids[0] and cb["state"] == DONE
    assert cb["result"] == final[ids[0]]["result"]
    assert http.get(f"/predict/async/{ids[0]}").json()["callback"] == "delivered"

    time.sleep(4.5)  # past the TTL of 4 s
    resp = http.get(f"/predict/async/{ids[1]}")
    assert resp.status_code == 410 and resp.json()["state"] == EXPIRED and "result" not in resp.json()
    time.sleep(4.5)  # a TTL after expiry the row is gone
    assert http.get(f"/predict/async/{ids[1]}").status_code == 404
    http.close()
    admin.close()
