"""Live traffic: the seeded simulator (``mlops.rollout.simulator``) driving a REAL service.

``LiveTraffic`` paces ``TrafficSimulator.stream`` in real time, sends every simulated
request as its own ``POST /predict`` (one user, one request: a failing candidate answer
never touches another user's request) from a small thread pool, and posts each label to
``/feedback`` when it "arrives", like a label pipeline: with the feedback token, under the
request id the service issued for the answer (it carries the simulator's own id, see
``mlops.predlog.RequestIds``). It only talks to loopback addresses and is bounded by
``max_seconds`` and ``max_requests``. What each client saw is tallied per
``(variant, HTTP status)``; failed requests are kept by the simulator's id so a test can
look up, in the prediction log, which variant failed them.

    token = read_feedback_token(settings)
    with LiveTraffic("http://127.0.0.1:3000", SimulatorConfig(rate_per_s=80), feedback_token=token) as traffic:
        ...                                   # run a rollout meanwhile
    traffic.tally                             # {("stable", 200): 5123, ("candidate", 500): 12, ...}
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from urllib.parse import urlparse

import httpx
import pandas as pd

from mlops.errors import PlatformError
from mlops.rollout.simulator import SimulatorConfig, TrafficSimulator

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class TrafficRefused(PlatformError):
    """The simulator was pointed at a non-loopback address (it only drives local services)."""


class LiveTraffic:
    """Simulated users against a live service, in a background thread (see module docstring)."""

    def __init__(
        self,
        base_url: str,
        config: SimulatorConfig,
        *,
        feedback_token: str,
        threads: int = 6,
        step_s: float = 0.25,
        max_seconds: float = 900.0,
        max_requests: int = 500_000,
    ) -> None:
        host = urlparse(base_url).hostname
        if host not in LOOPBACK:
            raise TrafficRefused(f"traffic simulation only drives loopback services, not {host}")
        self.base_url = base_url.rstrip("/")
        self.config = config
        self.threads, self.step_s = threads, step_s
        self.max_seconds, self.max_requests = max_seconds, max_requests
        self.tally: Counter[tuple[str, int]] = Counter()
        self.failed: dict[str, int] = {}  # request_id -> HTTP status
        self.sent = 0
        self.labels_sent = 0
        self.labels_refused = 0  # labels the service did not record (4xx): should stay 0
        self._issued: dict[str, str] = {}  # simulator's request id -> the id the service issued
        self.lagging = 0  # intervals sent late because the pool could not keep the pace
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=30,
            limits=httpx.Limits(max_connections=threads + 2, max_keepalive_connections=threads + 2),
        )
        self._auth = {"Authorization": f"Bearer {feedback_token}"}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LiveTraffic:
        """Start sending the simulated users' requests (and their labels) in the background."""
        self._thread = threading.Thread(target=self._run, name="live-traffic", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sending, wait for the sender (up to a minute) and close the HTTP client."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self._http.close()

    def __enter__(self) -> LiveTraffic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ sending

    def _send(self, payload: dict) -> None:
        body = {k: payload[k] for k in ("request_id", "entity_key", "features")}
        try:
            resp = self._http.post("/predict", json=body)
        except httpx.HTTPError:
            status, variant = 599, "unreachable"
        else:
            status = resp.status_code
            answer = resp.json()["predictions"][0] if status == 200 else None
            variant = answer["variant"] if answer is not None else "error"
        with self._lock:
            self.tally[(variant, status)] += 1
            if status != 200:
                self.failed[payload["request_id"]] = status
            else:
                self._issued[payload["request_id"]] = answer["request_id"]

    def _feedback(self, labels: pd.DataFrame) -> None:
        with self._lock:  # a request that failed has no answer to label
            items = [
                {"request_id": self._issued.pop(r), "label": int(lab)}
                for r, lab in zip(labels["request_id"], labels["label"], strict=True)
                if r in self._issued
            ]
        if not items:
            return
        try:
            resp = self._http.post("/feedback", json={"feedback": items}, headers=self._auth)
        except httpx.HTTPError:
            return
        if resp.status_code == 202:
            self.labels_sent += len(items)
        else:
            self.labels_refused += len(items)

    def _run(self) -> None:
        t0 = datetime.now(UTC)
        sim = TrafficSimulator(self.config, t0)
        wall0 = time.monotonic()
        with ThreadPoolExecutor(self.threads, thread_name_prefix="sim-user") as pool:
            for t, batch, labels in sim.stream(t0 + timedelta(seconds=self.max_seconds), self.step_s):
                if self._stop.is_set() or self.sent >= self.max_requests:
                    break
                delay = (t - pd.Timestamp(t0)).total_seconds() - (time.monotonic() - wall0)
                if delay > 0:
                    if self._stop.wait(delay):
                        break
                elif delay < -2 * self.step_s:
                    self.lagging += 1
                futures = [pool.submit(self._send, p) for p in batch.payloads()]
                self.sent += len(futures)
                for f in futures:  # bounded: never more than one interval in flight
                    f.result()
                self._feedback(labels)  # after the answers: a label quotes the id its answer carried
