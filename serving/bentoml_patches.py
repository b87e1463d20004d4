"""A fix for BentoML 1.4's TimeoutMiddleware, applied only while the installed version needs it.

``TimeoutMiddleware.__call__`` starts a ``traffic.timeout`` timer per request and never
cancels it, so every request leaves a timer and a future alive for the whole timeout; under
load they fill the oldest GC generation and full collections stall the worker for
70-300 ms. The replacement cancels the timer once the response has started and otherwise
behaves the same (504 when the app does not start answering in time). The leak, its
reproduction and the upstream fix: docs/design/bentoml-timeout-leak.md.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

log = logging.getLogger(__name__)

LEAK_MARKER = "loop.call_later(self.timeout"


def _status(cls: type) -> str:
    """``leaks``, ``fixed`` (upstream cancels its timer) or ``unknown`` (unrecognised code)."""
    try:
        source = inspect.getsource(cls.__call__)
    except (OSError, TypeError):
        return "unknown"
    if LEAK_MARKER not in source:
        return "unknown"
    return "fixed" if ".cancel()" in source.replace("fut.cancel()", "") else "leaks"


def patch_timeout_middleware(cls: type | None = None) -> bool:
    """Make ``cls`` (default: BentoML's TimeoutMiddleware) cancel its per-request timer.

    True if the patch is in place. When the installed code no longer leaks, or is not the
    code the patch was written for, nothing is changed and a log line says why.
    """
    if cls is None:
        from bentoml._internal.server.http import traffic  # noqa: PLC2701 (the code this patch fences)

        cls = traffic.TimeoutMiddleware
    if getattr(cls.__call__, "__mlops_patched__", False):
        return True
    status = _status(cls)
    if status == "fixed":
        log.info("%s already cancels its request timer: timeout patch not needed", cls.__qualname__)
        return False
    if status == "unknown":
        log.warning(
            "%s is not the code the timeout patch was written for: not patched; check "
            "docs/design/bentoml-timeout-leak.md against the installed bentoml",
            cls.__qualname__,
        )
        return False

    from starlette.responses import JSONResponse

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
    cls.__call__ = __call__  # type: ignore[method-assign]
    log.debug("%s patched to cancel its request timer", cls.__qualname__)
    return True


def patch_bentoml_timeout_middleware() -> bool:
    """Patch BentoML's TimeoutMiddleware (see ``patch_timeout_middleware``)."""
    return patch_timeout_middleware()
