"""A fix for BentoML 1.4's TimeoutMiddleware, applied only while the installed version needs it.

``TimeoutMiddleware.__call__`` does ``loop.call_later(timeout, ...)`` for every request and
never cancels the handle, so each request leaves a timer and a future alive for the whole
``traffic.timeout``: rps x timeout objects. They survive into the oldest GC generation and
trigger full collections that walk them all: BentoML's 70-300 ms stalls under load
(bench/serving_probe/RESULTS.md). The replacement cancels the timer once the response has
started and otherwise behaves the same (504 when the app does not start answering in time).
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any


def patch_bentoml_timeout_middleware() -> bool:
    """Make TimeoutMiddleware cancel its per-request timer; True if the patch is in place."""
    from bentoml._internal.server.http import traffic
    from starlette.responses import JSONResponse

    original = traffic.TimeoutMiddleware.__call__
    if getattr(original, "__mlops_patched__", False):
        return True
    source = inspect.getsource(original)
    leaks = "loop.call_later(self.timeout" in source and ".cancel()" not in source.replace("fut.cancel()", "")
    if not leaks:
        return False

    async def __call__(self: Any, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message: dict) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            await waiter
        except TimeoutError:
            if fut.cancel():
                body = {"error": f"Not able to process the request in {self.timeout} seconds"}
                await JSONResponse(body, status_code=504)(scope, receive, send)
        else:
            timer.cancel()
            await fut

    __call__.__mlops_patched__ = True  # type: ignore[attr-defined]
    traffic.TimeoutMiddleware.__call__ = __call__
    return True
