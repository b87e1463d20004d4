"""The HTTP surface of the online service: a Starlette app mounted into the BentoML service.

Scoring routes are plain ``async`` Starlette handlers (BentoML's typed ``@bentoml.api``
path reaches about a third of this throughput, see docs/design/serving-overhead.md): read
the body within its size limit and ``serving.body_timeout_seconds`` (a 408 when it does not
arrive in time; only a request whose body has arrived is admitted into an in-flight slot, so
clients that trickle their bodies cannot starve the others), validate with
``mlops.request_validation``, hand over to ``ServingRuntime``, answer JSON. Every client
error is a 4xx with ``{"error": message}``; being at capacity is a fast 503 with
``Retry-After``; a model past its deadline is a 504. OIP inference also speaks the binary
tensor data extension (``Inference-Header-Content-Length``) for inputs and outputs.

Endpoints (``name`` is the served registered model):

    POST /predict                         records in, score/decision/variant/version out
    POST /predict/async                   the same body queued as a job: 202 + job id (429 when full)
    GET  /predict/async/{job_id}          queued/running/done (the /predict answer)/failed/expired
    POST /feedback                        labels for earlier request ids (feedback or admin token)
    GET  /metrics                         Prometheus, per variant
    GET  /v2, /v2/health/live, /v2/health/ready
    GET  /v2/models/{name}[/versions/{v}][/ready]
    POST /v2/models/{name}[/versions/{v}]/infer
    GET|PUT /admin/state, POST /admin/routes, /admin/slots/{slot}, /admin/flip, /admin/models
    GET  /openapi.json (also /docs.json)
    POST /tenants/models/{name}/predict   a tenant's own model (only with serving.tenants.enabled)
    POST /tenants/feedback                labels for the tenant's own earlier request ids

Admin routes need ``Authorization: Bearer <token>`` (401 without, 403 when wrong) and take
an optional ``Idempotency-Key`` header. ``/feedback`` needs the feedback token or the admin
token; a version that is not loaded is scored through ``/versions/{v}/infer`` only when
``serving.load_on_demand`` is on and the caller sends the admin token. Predict and the OIP
routes are public; a forced variant (``x-mlops-variant``) is answered and logged as forced,
which no rollout gate counts. The tenant route needs a tenant token (401/403), answers 404
for any model that is not the caller's own and 429 with ``Retry-After`` past the tenant's
quota (answered after ``serving.tenants.refusal_delay_ms``, so a client retrying at once
is paced by the service). README (Security) states the threat model.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import sys
import time
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from mlops.onnx_model import PROBA_OUTPUT
from mlops.request_validation import BINARY_HEADER, InvalidRequest, V2Request, parse_json, split_binary
from mlops.routing import FORCE_HEADER, InvalidRouteTable
from mlops.settings import ServingConfig
from serving.async_jobs import AsyncJobs, QueueFull
from serving.auth import check_bearer
from serving.errors import ServingError, UnknownModel
from serving.openapi import openapi_document
from serving.runtime import ServingRuntime
from serving.state import DesiredState, PreloadRequest, RoutesSpec, SlotRequest
from serving.tenants import QuotaExceeded

log = logging.getLogger(__name__)

JSON = "application/json"
SERVER_NAME = "mlops-serving"
EXTENSIONS = ("binary_tensor_data",)
"""Open Inference Protocol extensions the service implements (listed by ``GET /v2``)."""
SCORING_PATHS = ("/predict", "/v2/models", "/feedback", "/tenants/models")
"""Paths with a per-request cost worth keeping BentoML's tracing middleware off."""


@dataclass
class RuntimeRef:
    """The app is built at import (BentoML needs it then); the runtime arrives at service start."""

    runtime: ServingRuntime | None = None
    openapi: bytes | None = None
    jobs: AsyncJobs | None = None


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _answer(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_dumps(obj), status, headers=headers, media_type=JSON)


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return _answer({"error": message}, status, headers)


async def _body(request: Request, cfg: ServingConfig) -> bytes:
    """The whole request body, read once (then cached on the request).

    413 when it is larger than ``cfg.max_body_bytes``, 408 when it has not fully arrived
    within ``cfg.body_timeout_seconds`` of the handler starting to read it.
    """
    cached = request.scope.get("mlops.body")
    if cached is not None:
        return cached
    limit = cfg.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None:
        if not (length.isascii() and length.isdigit()):
            raise InvalidRequest("Content-Length is not a number", 400)
        if int(length) > limit:
            raise InvalidRequest(f"body of {int(length)} bytes exceeds the limit of {limit} bytes", 413)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(cfg.body_timeout_seconds):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise InvalidRequest(f"body exceeds the limit of {limit} bytes", 413)
                chunks.append(chunk)
    except ClientDisconnect:
        raise InvalidRequest("client disconnected before sending the whole body", 400) from None
    except TimeoutError:
        expected = f" of {length}" if length is not None else ""
        raise InvalidRequest(
            f"request body not received within {cfg.body_timeout_seconds:g} s ({size}{expected} bytes arrived)",
            408,
        ) from None
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    request.scope["mlops.body"] = body
    return body


CLOSE_AFTER = frozenset({408, 413})
"""Statuses answered before the body was read in full: the connection is closed after them."""


def _denied(status: int, what: str, why: str = "") -> Response:
    """The 401 (no credentials) or 403 (wrong ones) answer for a route needing ``what``."""
    if status == 401:
        return _error(
            f"{what} required{why} (Authorization: Bearer <token>)",
            401,
            {"WWW-Authenticate": 'Bearer realm="mlops-serving"'},
        )
    return _error(f"{what} is wrong{why}", 403)


def _pydantic_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{where}: {err['msg']}{more}"


def _model(cls: type[BaseModel], body: bytes) -> Any:
    data = parse_json(body)
    if not isinstance(data, dict):
        raise InvalidRequest("body must be a JSON object", 400)
    try:
        return cls.model_validate_json(_dumps(data))
    except ValidationError as exc:
        raise InvalidRequest(_pydantic_error(exc)) from None
    except ValueError as exc:  # allow_nan=False in _dumps: NaN/Infinity given for a number
        raise InvalidRequest(f"invalid number in body: {exc}") from None
    except RecursionError:
        raise InvalidRequest("body is nested too deeply", 400) from None


def _v2_request(rt: ServingRuntime, request: Request, body: bytes) -> V2Request:
    """The validated OIP request of ``body``: JSON, or a JSON header plus binary tensor data."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise InvalidRequest(f"Content-Encoding {encoding[:40]!r} is not supported; send the body as is", 415)
    header_length = request.headers.get(BINARY_HEADER)
    if header_length is None:
        return rt.validator.v2_infer(parse_json(body), [PROBA_OUTPUT])
    header, binary = split_binary(body, header_length)
    return rt.validator.v2_infer(header, [PROBA_OUTPUT], binary)


def _v2_answer(answer: dict[str, Any], binary_outputs: frozenset[str]) -> Response:
    """The OIP response: JSON, or (when outputs were asked for as binary data) a JSON header
    whose length is in ``Inference-Header-Content-Length`` followed by those outputs' data."""
    if not binary_outputs:
        return _answer(answer)
    blobs = []
    for out in answer["outputs"]:
        if out["name"] in binary_outputs:
            values = array("f", out.pop("data"))  # every output of the model is FP32
            if sys.byteorder == "big":
                values.byteswap()
            raw = values.tobytes()
            out["parameters"] = {**out.get("parameters", {}), "binary_data_size": len(raw)}
            blobs.append(raw)
    header = _dumps(answer)
    return Response(
        b"".join([header, *blobs]),
        200,
        headers={"Inference-Header-Content-Length": str(len(header))},
        media_type="application/octet-stream",
    )


Handler = Callable[[Request, ServingRuntime], Awaitable[Response]]


def build_app(ref: RuntimeRef) -> Starlette:
    """The Starlette app of every endpoint above, reading the runtime from ``ref``."""

    def endpoint(
        name: str, *, scoring: bool = False
    ) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
        def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
            async def run(request: Request) -> Response:
                rt = ref.runtime
                if rt is None:
                    return _error("the service is starting", 503, {"Retry-After": "1"})
                try:
                    if scoring:
                        await _body(request, rt.cfg)  # before admission: a slow body holds no slot
                        rt.admit()
                        try:
                            return await handler(request, rt)
                        finally:
                            rt.done()
                    return await handler(request, rt)
                except InvalidRequest as exc:
                    rt.metrics.rejected.labels(name, str(exc.status)).inc()
                    return _error(
                        str(exc), exc.status, {"Connection": "close"} if exc.status in CLOSE_AFTER else None
                    )
                except InvalidRouteTable as exc:
                    rt.metrics.rejected.labels(name, "400").inc()
                    return _error(str(exc), 400)
                except ServingError as exc:
                    if exc.status in (503, 504, 409, 404, 422):
                        rt.metrics.rejected.labels(name, str(exc.status)).inc()
                    headers = {"Retry-After": "1"} if exc.status == 503 else None
                    return _error(str(exc), exc.status, headers)

            run.__name__ = name
            return run

        return wrap

    # ------------------------------------------------------------------ scoring

    @endpoint("predict", scoring=True)
    async def predict(request: Request, rt: ServingRuntime) -> Response:
        started = time.perf_counter()
        records = rt.validator.predict(parse_json(await _body(request, rt.cfg)))
        return _answer(await rt.predict(records, request.headers.get(FORCE_HEADER), started))

    @endpoint("feedback", scoring=True)
    async def feedback(request: Request, rt: ServingRuntime) -> Response:
        denied = check_bearer(request.headers.get("authorization"), rt.feedback_token, rt.token)
        if denied is not None:
            rt.metrics.rejected.labels("feedback", str(denied)).inc()
            return _denied(denied, "feedback token (or admin token)")
        items = rt.validator.feedback(parse_json(await _body(request, rt.cfg)))
        return _answer(rt.feedback(items), 202)

    # ------------------------------------------------------------------ tenants

    async def tenant_predict(request: Request) -> Response:
        rt = ref.runtime
        if rt is None:
            return _error("the service is starting", 503, {"Retry-After": "1"})
        tenants = rt.tenants
        if tenants is None:
            return _error("tenant serving is off (serving.tenants.enabled)", 404)
        tenant, denied = tenants.directory.tenant_of(request.headers.get("authorization"))
        if tenant is None:
            rt.metrics.rejected.labels("tenant_predict", str(denied)).inc()
            return _denied(denied, "tenant token")
        started = time.perf_counter()
        try:
            tenants.admit(tenant)
        except QuotaExceeded as exc:
            rt.metrics.tenant_answered(tenant, 429)
            headers = {"Retry-After": str(exc.retry_after)}
            if not await tenants.hold_refusal(tenant):
                headers["Connection"] = "close"
            return _error(str(exc), 429, headers)
        request.scope["mlops.tenant"] = (tenant, started)
        try:
            response = await _tenant_scored(request)
        finally:
            tenants.done(tenant)
        rt.metrics.tenant_answered(tenant, response.status_code)
        return response

    @endpoint("tenant_predict", scoring=True)
    async def _tenant_scored(request: Request, rt: ServingRuntime) -> Response:
        tenant, started = request.scope["mlops.tenant"]
        records = rt.validator.predict(parse_json(await _body(request, rt.cfg)))
        return _answer(await rt.tenant_predict(tenant, request.path_params["name"], records, started))

    async def tenant_feedback(request: Request) -> Response:
        rt = ref.runtime
        if rt is None:
            return _error("the service is starting", 503, {"Retry-After": "1"})
        if rt.tenants is None:
            return _error("tenant serving is off (serving.tenants.enabled)", 404)
        tenant, denied = rt.tenants.directory.tenant_of(request.headers.get("authorization"))
        if tenant is None:
            rt.metrics.rejected.labels("tenant_feedback", str(denied)).inc()
            return _denied(denied, "tenant token")
        request.scope["mlops.tenant"] = (tenant, time.perf_counter())
        return await _tenant_labels(request)

    @endpoint("tenant_feedback", scoring=True)
    async def _tenant_labels(request: Request, rt: ServingRuntime) -> Response:
        tenant, _ = request.scope["mlops.tenant"]
        items = rt.validator.feedback(parse_json(await _body(request, rt.cfg)))
        return _answer(rt.tenant_feedback(tenant, items), 202)

    # ------------------------------------------------------------------ async jobs

    def _jobs() -> AsyncJobs:
        if ref.jobs is None:
            raise UnknownModel("async inference is off (serving.async_jobs.enabled)")
        return ref.jobs

    @endpoint("predict_async")
    async def predict_async(request: Request, rt: ServingRuntime) -> Response:
        jobs = _jobs()
        try:
            job = await jobs.submit(await _body(request, rt.cfg), request.headers.get(FORCE_HEADER))
        except QueueFull as exc:
            rt.metrics.rejected.labels("predict_async", "429").inc()
            return _error(str(exc), 429, {"Retry-After": "1"})
        return _answer(job, 202, {"Location": job["status_url"]})

    @endpoint("predict_async_job")
    async def predict_async_job(request: Request, rt: ServingRuntime) -> Response:
        status, job = await _jobs().lookup(request.path_params["job_id"])
        return _answer(job, status)

    async def metrics(request: Request) -> Response:
        rt = ref.runtime
        if rt is None:
            return _error("the service is starting", 503, {"Retry-After": "1"})
        return Response(rt.render_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------ OIP v2

    def _check_name(rt: ServingRuntime, name: str) -> None:
        if name != rt.model_name:
            raise UnknownModel(f"unknown model '{name[:100]}' (this service serves '{rt.model_name}')")

    def _version(raw: str) -> int:
        if not raw.isdigit() or int(raw) < 1 or len(raw) > 12:
            raise InvalidRequest(f"version must be a positive integer, got {raw[:40]!r}", 400)
        return int(raw)

    def _metadata(rt: ServingRuntime, versions: list[int]) -> dict[str, Any]:
        ds = rt.settings.dataset
        inputs = [{"name": n, "datatype": "FP32", "shape": [-1, 1]} for n in ds.numeric_names]
        inputs += [{"name": n, "datatype": "BYTES", "shape": [-1, 1]} for n in ds.categorical_names]
        return {
            "name": rt.model_name,
            "versions": [str(v) for v in versions],
            "platform": "onnxruntime_onnx",
            "inputs": inputs,
            "outputs": [{"name": PROBA_OUTPUT, "datatype": "FP32", "shape": [-1, 2]}],
        }

    @endpoint("v2_server")
    async def server_metadata(request: Request, rt: ServingRuntime) -> Response:
        from importlib.metadata import version

        return _answer(
            {"name": SERVER_NAME, "version": version("mlops-platform"), "extensions": list(EXTENSIONS)}
        )

    async def live(request: Request) -> Response:
        return _answer({"live": True})

    @endpoint("v2_ready")
    async def ready(request: Request, rt: ServingRuntime) -> Response:
        return _answer({"ready": rt.ready}, 200 if rt.ready else 503)

    @endpoint("v2_model")
    async def model_metadata(request: Request, rt: ServingRuntime) -> Response:
        _check_name(rt, request.path_params["name"])
        return _answer(_metadata(rt, sorted(rt.state.versions())))

    @endpoint("v2_model_ready")
    async def model_ready(request: Request, rt: ServingRuntime) -> Response:
        _check_name(rt, request.path_params["name"])
        return _answer({"name": rt.model_name, "ready": rt.ready}, 200 if rt.ready else 503)

    @endpoint("v2_infer", scoring=True)
    async def infer(request: Request, rt: ServingRuntime) -> Response:
        started = time.perf_counter()
        _check_name(rt, request.path_params["name"])
        req = _v2_request(rt, request, await _body(request, rt.cfg))
        return _v2_answer(await rt.infer(req, request.headers.get(FORCE_HEADER), started), req.binary_outputs)

    @endpoint("v2_version")
    async def version_metadata(request: Request, rt: ServingRuntime) -> Response:
        _check_name(rt, request.path_params["name"])
        v = _version(request.path_params["version"])
        if rt.pool.get(v) is None:
            await _exists(rt, v)
        return _answer(_metadata(rt, [v]))

    async def _exists(rt: ServingRuntime, v: int) -> None:
        if not await asyncio.to_thread(rt.source.exists, v):
            raise UnknownModel(f"model '{rt.model_name}' has no version {v}")

    @endpoint("v2_version_ready")
    async def version_ready(request: Request, rt: ServingRuntime) -> Response:
        _check_name(rt, request.path_params["name"])
        v = _version(request.path_params["version"])
        loaded = rt.pool.get(v) is not None
        if not loaded:
            await _exists(rt, v)
        return _answer({"name": rt.model_name, "version": str(v), "ready": loaded}, 200 if loaded else 503)

    @endpoint("v2_version_infer", scoring=True)
    async def version_infer(request: Request, rt: ServingRuntime) -> Response:
        started = time.perf_counter()
        _check_name(rt, request.path_params["name"])
        v = _version(request.path_params["version"])
        load = False
        if rt.cfg.load_on_demand and rt.pool.get(v) is None:
            denied = check_bearer(request.headers.get("authorization"), rt.token)
            if denied is not None:
                rt.metrics.rejected.labels("v2_version_infer", str(denied)).inc()
                return _denied(denied, "admin token", f" to load version {v} on demand (it is not loaded)")
            load = True
        req = _v2_request(rt, request, await _body(request, rt.cfg))
        return _v2_answer(await rt.infer_version(v, req, started, load=load), req.binary_outputs)

    # ------------------------------------------------------------------ admin

    def admin(
        name: str, *, idempotent: bool = True
    ) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
        def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
            @endpoint(name)
            async def run(request: Request, rt: ServingRuntime) -> Response:
                denied = check_bearer(request.headers.get("authorization"), rt.token)
                if denied is not None:
                    return _denied(denied, "admin token")
                key = request.headers.get("idempotency-key")
                if not idempotent or request.method == "GET" or key is None:
                    return await handler(request, rt)
                if not 0 < len(key) <= 200:
                    raise InvalidRequest("Idempotency-Key must be 1-200 characters", 400)
                body = await _body(request, rt.cfg)
                fingerprint = hashlib.sha256(
                    request.method.encode() + request.url.path.encode() + b"\0" + body
                ).hexdigest()
                hit = rt.remembered(key, fingerprint)
                if hit is not None:
                    return _answer(hit[1], hit[0], {"Idempotent-Replayed": "true"})
                response = await handler(request, rt)
                if response.status_code < 500:
                    rt.remember(key, fingerprint, response.status_code, json.loads(response.body))
                return response

            return run

        return wrap

    def _key(request: Request) -> str | None:
        return request.headers.get("idempotency-key")

    @admin("admin_state")
    async def admin_state(request: Request, rt: ServingRuntime) -> Response:
        if request.method == "GET":
            return _answer(rt.describe())
        desired = _model(DesiredState, await _body(request, rt.cfg))
        return _answer(await rt.apply(desired, _key(request)))

    @admin("admin_routes")
    async def admin_routes(request: Request, rt: ServingRuntime) -> Response:
        routes = _model(RoutesSpec, await _body(request, rt.cfg))
        return _answer(await rt.set_routes(routes, _key(request)))

    @admin("admin_slot")
    async def admin_slot(request: Request, rt: ServingRuntime) -> Response:
        slot = request.path_params["slot"]
        if slot not in ("stable", "candidate"):
            raise UnknownModel(f"no slot {slot[:40]!r}: slots are stable and candidate")
        req = _model(SlotRequest, await _body(request, rt.cfg))
        return _answer(await rt.set_slot(slot, req.version, req.alias, _key(request)))

    @admin("admin_flip")
    async def admin_flip(request: Request, rt: ServingRuntime) -> Response:
        return _answer(await rt.flip(_key(request)))

    @admin("admin_models")
    async def admin_models(request: Request, rt: ServingRuntime) -> Response:
        req = _model(PreloadRequest, await _body(request, rt.cfg))
        return _answer(await rt.preload(req.version))

    async def openapi(request: Request) -> Response:
        rt = ref.runtime
        if rt is None:
            return _error("the service is starting", 503, {"Retry-After": "1"})
        if ref.openapi is None:
            from importlib.metadata import version

            ref.openapi = _dumps(
                openapi_document(
                    rt.settings.dataset,
                    rt.model_name,
                    max_rows=rt.cfg.max_batch_rows,
                    version=version("mlops-platform"),
                    online=rt.online.keys if rt.online is not None else None,
                )
            )
        return Response(ref.openapi, media_type=JSON)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.detail, exc.status_code, getattr(exc, "headers", None))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        rt = ref.runtime
        if rt is not None:
            rt.start()
            if rt.cfg.async_jobs.enabled:
                ref.jobs = AsyncJobs(rt)
                await ref.jobs.start()
        try:
            yield
        finally:
            if ref.jobs is not None:  # before the runtime: running jobs finish and are logged
                await ref.jobs.stop()
                ref.jobs = None
            if ref.runtime is not None:
                await ref.runtime.stop()

    routes = [
        Route("/predict", predict, methods=["POST"]),
        Route(
            "/tenants/models/{name}/predict", tenant_predict, methods=["POST"]
        ),  # early: routes match in order
        Route("/predict/async", predict_async, methods=["POST"]),
        Route("/predict/async/{job_id}", predict_async_job, methods=["GET"]),
        Route("/feedback", feedback, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/{name}", model_metadata, methods=["GET"]),
        Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}", version_metadata, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/ready", version_ready, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/infer", version_infer, methods=["POST"]),
        Route("/admin/state", admin_state, methods=["GET", "PUT"]),
        Route("/admin/routes", admin_routes, methods=["POST"]),
        Route("/admin/slots/{slot}", admin_slot, methods=["POST"]),
        Route("/admin/flip", admin_flip, methods=["POST"]),
        Route("/admin/models", admin_models, methods=["POST"]),
        Route("/tenants/feedback", tenant_feedback, methods=["POST"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/docs.json", openapi, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
