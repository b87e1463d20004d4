"""Baseline: the smallest reasonable Starlette + ONNX Runtime scoring app.

Run: uvicorn minimal_app:app --host 127.0.0.1 --port P --no-access-log --log-level warning
"""

from __future__ import annotations

import contextlib
import json

from model import Scorer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_scorer: Scorer | None = None


def _get_scorer() -> Scorer:
    global _scorer
    if _scorer is None:
        _scorer = Scorer()
    return _scorer


async def predict(request: Request) -> Response:
    body = json.loads(await request.body())
    scores = _get_scorer().score(body["rows"])
    return Response(json.dumps(scores), media_type="application/json")


async def health(_: Request) -> Response:
    return Response("ok")


@contextlib.asynccontextmanager
async def lifespan(_: Starlette):
    _get_scorer()
    yield


app = Starlette(
    routes=[Route("/predict", predict, methods=["POST"]), Route("/readyz", health)],
    lifespan=lifespan,
)
