"""HTTP client of the online service, for the rollout flow, the CLI and tests.

``ServingAdmin`` is the interface a rollout needs: read the applied state, apply a desired
state. ``ServingClient`` is the real one (httpx, sync); ``FakeServingAdmin`` keeps the same
state in memory with the same validation, for tests of code that drives a service.

    client = ServingClient.for_settings(settings)          # URL and token from settings
    client.apply({"mode": "canary", "weight_pct": 5, "salt": rollout_id,
                  "stable_version": 3, "candidate_version": 4}, key=effect.key)
    client.state()["weight_pct"]                            # -> 5.0

Errors are translated here: ``ServingUnavailable`` when the service cannot be reached (or
answers 5xx), ``ServingRequestFailed`` (with ``status``) when it refuses the request.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import httpx
from pydantic import ValidationError

from mlops.errors import PlatformError
from mlops.routing import FORCE_HEADER, InvalidRouteTable
from mlops.settings import Settings
from serving.state import DesiredState


class ServingUnavailable(PlatformError):
    """The online service cannot be reached, or answered with a server error (5xx)."""

    exit_code = 7

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ServingRequestFailed(PlatformError):
    """The online service refused a request (4xx); ``status`` and the service's message."""

    exit_code = 7

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class ServingAdmin(Protocol):
    """What a rollout needs from the serving layer."""

    def state(self) -> dict[str, Any]:
        """The applied state: ``DesiredState`` fields plus slots and bookkeeping."""
        ...

    def apply(self, desired: Mapping[str, Any], *, key: str | None = None) -> dict[str, Any]:
        """Make ``desired`` (``DesiredState`` fields) the serving state; the applied state."""
        ...


class ServingClient:
    """The online service's data plane and admin API over HTTP."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        feedback_token: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.feedback_token = feedback_token
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    @classmethod
    def for_settings(
        cls, settings: Settings, *, base_url: str | None = None, timeout: float = 60.0
    ) -> ServingClient:
        """A client for this instance's service, with its admin and feedback tokens (config or
        token files; a missing feedback token falls back to the admin token)."""
        from mlops.errors import ConfigError
        from serving.auth import read_feedback_token, read_token

        try:
            feedback_token: str | None = read_feedback_token(settings)
        except ConfigError:
            feedback_token = None
        return cls(
            base_url or settings.serving_url,
            read_token(settings),
            feedback_token=feedback_token,
            timeout=timeout,
        )

    def close(self) -> None:
        """Close the HTTP connections."""
        self._http.close()

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transport

    def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        admin: bool = False,
        labels: bool = False,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        hdrs = dict(headers or {})
        if admin:
            if not self.token:
                raise ServingRequestFailed("this client has no admin token", 401)
            hdrs["Authorization"] = f"Bearer {self.token}"
        elif labels:
            token = self.feedback_token or self.token
            if not token:
                raise ServingRequestFailed("this client has no feedback token (nor an admin token)", 401)
            hdrs["Authorization"] = f"Bearer {token}"
        if key is not None:
            hdrs["Idempotency-Key"] = key
        try:
            resp = self._http.request(method, path, json=json, headers=hdrs)
        except httpx.HTTPError as exc:
            raise ServingUnavailable(
                f"serving at {self.base_url} unreachable ({method} {path}): {exc}"
            ) from exc
        if resp.status_code >= 400:
            try:
                message = resp.json().get("error", resp.text)
            except ValueError:
                message = resp.text.strip()[:300]
            text = f"{method} {path} -> {resp.status_code}: {message}"
            if resp.status_code >= 500:
                raise ServingUnavailable(text, resp.status_code)
            raise ServingRequestFailed(text, resp.status_code)
        return resp

    # ------------------------------------------------------------------ data plane

    def predict(
        self, records: Sequence[Mapping[str, Any]], *, force: str | None = None
    ) -> list[dict[str, Any]]:
        """Score records (``{"features": {...}, "entity_key"?, "request_id"?}``); one answer each."""
        headers = {FORCE_HEADER: force} if force else None
        body = records[0] if len(records) == 1 else {"records": list(records)}
        return self._call("POST", "/predict", json=body, headers=headers).json()["predictions"]

    def submit_async(
        self,
        records: Sequence[Mapping[str, Any]],
        *,
        force: str | None = None,
        callback_url: str | None = None,
    ) -> str:
        """Queue records for async scoring (``POST /predict/async``); the job id.

        A full queue raises ``ServingRequestFailed`` with status 429 (retry later).
        """
        headers = {FORCE_HEADER: force} if force else None
        body: dict[str, Any] = dict(records[0]) if len(records) == 1 else {"records": list(records)}
        if callback_url is not None:
            body["callback_url"] = callback_url
        return self._call("POST", "/predict/async", json=body, headers=headers).json()["job_id"]

    def job(self, job_id: str) -> dict[str, Any]:
        """An async job's state (``queued``, ``running``, ``done`` with ``result``, ``failed``
        with ``error``, or ``expired``); ``ServingRequestFailed`` 404 for an unknown id."""
        try:
            return self._call("GET", f"/predict/async/{job_id}").json()
        except ServingRequestFailed as exc:
            if exc.status != 410:
                raise
            return {"job_id": job_id, "state": "expired", "error": str(exc)}

    def wait_job(self, job_id: str, *, timeout: float = 60.0, poll: float = 0.2) -> dict[str, Any]:
        """Poll an async job until it is done, failed or expired; ``ServingUnavailable`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["state"] in ("done", "failed", "expired"):
                return job
            if time.monotonic() > deadline:
                raise ServingUnavailable(f"async job {job_id} still {job['state']} after {timeout:g} s")
            time.sleep(poll)

    def feedback(self, labels: Sequence[tuple[str, int]]) -> int:
        """Send (request_id, label) pairs, the ids as ``predict`` returned them, with the
        feedback token (else the admin token); how many new labels were recorded. All or
        none: an id the service did not issue (422) or a label that differs from the first
        one of its request (409) fails the whole batch (``ServingRequestFailed``)."""
        body = {"feedback": [{"request_id": r, "label": int(lab)} for r, lab in labels]}
        return self._call("POST", "/feedback", json=body, labels=True).json()["accepted"]

    def ready(self) -> bool:
        """Whether the service answers ready on ``/v2/health/ready``; False when it cannot be reached."""
        try:
            return self._http.get("/v2/health/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def metrics(self) -> str:
        """The service's Prometheus metrics, as exposition text."""
        return self._call("GET", "/metrics").text

    # ------------------------------------------------------------------ admin

    def state(self) -> dict[str, Any]:
        """The applied state: ``DesiredState`` fields plus slots and bookkeeping."""
        return self._call("GET", "/admin/state", admin=True).json()

    def apply(self, desired: Mapping[str, Any], *, key: str | None = None) -> dict[str, Any]:
        """Make ``desired`` (``DesiredState`` fields) the serving state; the applied state."""
        return self._call("PUT", "/admin/state", json=dict(desired), admin=True, key=key).json()

    def set_routes(self, routes: Mapping[str, Any], *, key: str | None = None) -> dict[str, Any]:
        """Set the routes, slots unchanged; the applied state."""
        return self._call("POST", "/admin/routes", json=dict(routes), admin=True, key=key).json()

    def load_slot(
        self, slot: str, *, version: int | None = None, alias: str | None = None, key: str | None = None
    ) -> dict[str, Any]:
        """Load ``version`` (or the version ``alias`` points at) into ``slot``; the applied state."""
        body: dict[str, Any] = {"alias": alias} if alias is not None else {"version": version}
        return self._call("POST", f"/admin/slots/{slot}", json=body, admin=True, key=key).json()

    def flip(self, *, key: str | None = None) -> dict[str, Any]:
        """Swap the active slot of blue_green routing; the applied state."""
        return self._call("POST", "/admin/flip", admin=True, key=key).json()

    def preload(self, version: int) -> dict[str, Any]:
        """Load ``version`` into the model pool without giving it a slot; the applied state."""
        return self._call("POST", "/admin/models", json={"version": version}, admin=True).json()


class FakeServingAdmin:
    """In-memory stand-in for the admin API: same validation, same answer shape (no models).

    ``versions`` are the versions that "exist"; applying another one fails like the
    service does (``ServingRequestFailed`` 404).
    """

    def __init__(
        self, versions: Sequence[int], desired: Mapping[str, Any] | None = None, model_name: str = "model"
    ):
        self.versions = set(versions)
        self.model_name = model_name
        self.generation = 0
        self.applied: list[dict[str, Any]] = []
        self._keys: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        self._desired = DesiredState.model_validate(dict(desired)) if desired else None

    def state(self) -> dict[str, Any]:
        """The applied state in the service's answer shape (no slot or pool details)."""
        d = (
            self._desired.model_dump()
            if self._desired
            else {"stable_version": None, "candidate_version": None}
        )
        return {
            "model_name": self.model_name,
            **d,
            "generation": self.generation,
            "ready": self._desired is not None,
        }

    def apply(self, desired: Mapping[str, Any], *, key: str | None = None) -> dict[str, Any]:
        """Validate and apply ``desired`` as the service does; the applied state plus ``changed``."""
        if key is not None and key in self._keys:
            body, answer = self._keys[key]
            if body != dict(desired):
                raise ServingRequestFailed(
                    f"Idempotency-Key {key!r} was already used for a different request", 422
                )
            return answer
        try:
            state = DesiredState.model_validate(dict(desired))
            table = state.table()
        except (ValidationError, InvalidRouteTable) as exc:
            raise ServingRequestFailed(str(exc).splitlines()[0], 422) from None
        if table.mode.value != "single" and state.candidate_version is None:
            raise ServingRequestFailed(f"{table.mode.value} routing needs a model in the candidate slot", 409)
        for v in (state.stable_version, state.candidate_version):
            if v is not None and v not in self.versions:
                raise ServingRequestFailed(f"model '{self.model_name}' has no version {v}", 404)
        changed = state != self._desired
        if changed:
            self._desired = state
            self.generation += 1
            self.applied.append(state.model_dump())
        answer = self.state() | {"changed": changed}
        if key is not None:
            self._keys[key] = (dict(desired), answer)
        return answer
