"""The fence around BentoML internals: the TimeoutMiddleware timer patch applies to the locked
bentoml, fixes the leak it exists for, keeps the 504, and says so when it does nothing."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from typing import Any

import pytest

from serving.bentoml_patches import patch_timeout_middleware


def pristine_middleware() -> type:
    """BentoML's TimeoutMiddleware as installed, from a fresh copy of its module (so a patch
    applied elsewhere in this process does not hide the original code)."""
    spec = importlib.util.find_spec("bentoml._internal.server.http.traffic")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TimeoutMiddleware


async def _app(scope: dict, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _slow_app(scope: dict, receive: Any, send: Any) -> None:
    await asyncio.sleep(5)
    await _app(scope, receive, send)


def _serve(cls: type, app: Any, requests: int, timeout: float) -> tuple[list[int], int]:
    """Statuses of ``requests`` calls through the middleware, and the timers still armed after."""

    async def main() -> tuple[list[int], int]:
        mw = cls(app, timeout=timeout)
        statuses: list[int] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        for _ in range(requests):
            await mw({"type": "http", "path": "/", "method": "GET", "headers": []}, receive, send)
        loop = asyncio.get_running_loop()
        armed = sum(1 for h in loop._scheduled if not h.cancelled())  # type: ignore[attr-defined]
        return statuses, armed

    return asyncio.run(main())


def test_the_locked_bentoml_leaks_a_timer_per_request_and_the_patch_applies_and_stops_it() -> None:
    """Unpatched, every request leaves its timeout timer armed; the patch applies to the
    installed version (if bentoml fixed the leak upstream, this test says so) and afterwards
    no timer outlives its request."""
    cls = pristine_middleware()
    statuses, armed = _serve(cls, _app, 50, timeout=60)
    assert statuses == [200] * 50 and armed == 50
    assert patch_timeout_middleware(cls) is True
    assert patch_timeout_middleware(cls) is True  # idempotent
    statuses, armed = _serve(cls, _app, 50, timeout=60)
    assert statuses == [200] * 50 and armed == 0


def test_the_patched_middleware_still_answers_504_when_the_app_is_too_slow() -> None:
    cls = pristine_middleware()
    patch_timeout_middleware(cls)
    statuses, _ = _serve(cls, _slow_app, 1, timeout=0.05)
    assert statuses == [504]


class _FixedUpstream:
    """A TimeoutMiddleware as a fixed bentoml would write it: the timer is cancelled."""

    def __init__(self, app: Any, timeout: float) -> None:
        self.app, self.timeout = app, timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        handle = loop.call_later(self.timeout, waiter.cancel)
        try:
            await self.app(scope, receive, send)
        finally:
            handle.cancel()


class _Rewritten:
    """A TimeoutMiddleware rewritten in a way the patch does not recognise."""

    def __init__(self, app: Any, timeout: float) -> None:
        self.app, self.timeout = app, timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        async with asyncio.timeout(self.timeout):
            await self.app(scope, receive, send)


def test_no_patch_and_a_log_line_when_the_middleware_no_longer_leaks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    original = _FixedUpstream.__call__
    with caplog.at_level(logging.INFO, logger="serving.bentoml_patches"):
        assert patch_timeout_middleware(_FixedUpstream) is False
    assert _FixedUpstream.__call__ is original
    assert "patch not needed" in caplog.text


def test_no_patch_and_a_warning_when_the_middleware_is_unrecognised(caplog: pytest.LogCaptureFixture) -> None:
    original = _Rewritten.__call__
    with caplog.at_level(logging.INFO, logger="serving.bentoml_patches"):
        assert patch_timeout_middleware(_Rewritten) is False
    assert _Rewritten.__call__ is original
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "not patched" in caplog.text
