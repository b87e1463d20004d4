"""BentoML 1.4 service variants for the serving benchmark, chosen by environment.

``bentoml serve bento_service:Probe --host 127.0.0.1 --port P`` with

* ``PROBE_KIND``: ``typed`` (``@bentoml.api`` sync method, BentoML runs it in a thread),
  ``typed_async`` (``@bentoml.api`` async method, inference inline on the event loop),
  ``asgi`` (a Starlette app mounted with ``@bentoml.asgi_app``, inference inline in the
  handler), ``asgi_thread`` (the same, inference in the threadpool).
* ``PROBE_CFG``: JSON merged into ``@bentoml.service(...)`` (workers, threads, traffic,
  metrics, logging, tracing ...).
* ``PROBE_GC``: ``freeze`` calls ``gc.freeze()`` after start-up; ``off`` disables the
  cyclic collector in the worker; a number sets generation-0's threshold.

Every variant answers ``POST /predict`` with the same JSON body and response as the
minimal app, so one load generator drives them all.
"""

from __future__ import annotations

import gc
import json
import os

import bentoml
from model import Scorer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

KIND = os.environ.get("PROBE_KIND", "typed")
CONFIG = json.loads(os.environ.get("PROBE_CFG") or "{}")
GC_MODE = os.environ.get("PROBE_GC", "")


def _install_gc_log(path: str) -> None:
    """Append every collection slower than 5 ms (generation, ms, collected) to ``path``."""
    import time

    state: dict[str, float] = {}

    def cb(phase: str, info: dict) -> None:
        if phase == "start":
            state["t"] = time.perf_counter()
        else:
            ms = (time.perf_counter() - state.get("t", time.perf_counter())) * 1e3
            if ms > 5:
                with open(path, "a") as fh:
                    fh.write(
                        f"{time.time():.3f} pid={os.getpid()} gen={info['generation']} "
                        f"{ms:.1f}ms collected={info['collected']} "
                        f"objects={len(gc.get_objects())}\n"
                    )

    gc.callbacks.append(cb)


def _apply_gc_mode() -> None:
    if os.environ.get("PROBE_GCLOG"):
        _install_gc_log(os.environ["PROBE_GCLOG"])
    if GC_MODE == "freeze":
        gc.collect()
        gc.freeze()
    elif GC_MODE == "off":
        gc.disable()
    elif GC_MODE:
        gc.set_threshold(int(GC_MODE), 50, 100)


def _patch_timeout_middleware() -> None:
    """Make BentoML's TimeoutMiddleware cancel its per-request timer when the request ends.

    bentoml 1.4's middleware calls ``loop.call_later(timeout, ...)`` per request and never
    cancels the handle, so every request leaves a timer (and its future) alive for the
    whole timeout: rps x timeout objects that the cyclic GC keeps walking.
    """
    import asyncio

    from bentoml._internal.server.http import traffic
    from starlette.responses import JSONResponse

    async def __call__(self, scope, receive, send):  # same behaviour, timer cancelled
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        handle = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message):
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            await waiter
        except TimeoutError:
            if fut.cancel():
                resp = JSONResponse(
                    {"error": f"Not able to process the request in {self.timeout} seconds"}, status_code=504
                )
                await resp(scope, receive, send)
        else:
            handle.cancel()
            await fut

    traffic.TimeoutMiddleware.__call__ = __call__


if os.environ.get("PROBE_PATCH_TIMEOUT"):
    _patch_timeout_middleware()


_scorer_cache: list[Scorer] = []


def _scorer() -> Scorer:
    if not _scorer_cache:
        _scorer_cache.append(bentoml.get_current_service().scorer)
    return _scorer_cache[0]


async def predict_inline(request: Request) -> Response:
    body = json.loads(await request.body())
    return Response(json.dumps(_scorer().score(body["rows"])), media_type="application/json")


async def predict_threaded(request: Request) -> Response:
    from starlette.concurrency import run_in_threadpool

    body = json.loads(await request.body())
    scores = await run_in_threadpool(_scorer().score, body["rows"])
    return Response(json.dumps(scores), media_type="application/json")


scoring_app = Starlette(
    routes=[
        Route("/predict", predict_threaded if KIND == "asgi_thread" else predict_inline, methods=["POST"])
    ]
)


class _Base:
    def __init__(self) -> None:
        self.scorer = Scorer()
        self.scorer.score([[0.0] * 30])
        _apply_gc_mode()


if KIND == "typed":

    @bentoml.service(name="probe", **CONFIG)
    class Probe(_Base):
        @bentoml.api
        def predict(self, rows: list[list[float]]) -> list[float]:
            return self.scorer.score(rows)

elif KIND == "typed_async":

    @bentoml.service(name="probe", **CONFIG)
    class Probe(_Base):
        @bentoml.api
        async def predict(self, rows: list[list[float]]) -> list[float]:
            return self.scorer.score(rows)

elif KIND in ("asgi", "asgi_thread"):

    @bentoml.asgi_app(scoring_app, path="/")
    @bentoml.service(name="probe", **CONFIG)
    class Probe(_Base):
        pass

else:
    raise ValueError(f"unknown PROBE_KIND {KIND!r}")
