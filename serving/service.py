"""The BentoML service of the platform's online inference: ``bentoml serve serving.service:ScoringService``.

A real ``@bentoml.service`` (``bentoml build`` packages it with ``bentofile.yaml``) whose
routes live in a Starlette app mounted with ``@bentoml.asgi_app`` (``serving.app``), the
design measured in docs/design/serving-overhead.md: async handlers, BentoML's tracing kept
off the scoring paths, its metrics middleware and access log off (the service exports its
own per-variant Prometheus metrics and logs every answer to the prediction log), one
worker (routes and slots are process state), and the TimeoutMiddleware timer fix.

Configuration is the platform's: the process reads ``MLOPS_HOME`` / ``MLOPS_CONFIG`` /
``MLOPS__*`` when the service starts (not at import), loads the registry versions behind
the configured aliases (or the state it last applied) and only then reports ready.
"""

from __future__ import annotations

import gc
import logging
import sys

import bentoml

from serving.app import SCORING_PATHS, RuntimeRef, build_app

log = logging.getLogger(__name__)

_ref = RuntimeRef()
app = build_app(_ref)

SWITCH_INTERVAL_S = 0.0002
"""GIL switch interval of the service process. Scoring runs in one thread per model (so a
hung model cannot stall the event loop); with CPython's default 5 ms, a scoring thread
waiting to hand back its result, or the loop waiting to parse the next request, can wait
up to 5 ms behind the other. 0.2 ms cut the CPU per request by about a quarter at
concurrency 8 in an in-process measurement, with no cost when threads do not contend."""

SERVICE_CONFIG = {
    "name": "mlops-serving",
    "workers": 1,
    # Whole-request limit enforced by BentoML; scoring has its own, shorter deadline
    # (serving.request_timeout_seconds). Long enough for an admin call loading a version.
    "traffic": {"timeout": 60},
    "logging": {"access": {"enabled": False}},
    "tracing": {"excluded_urls": [*SCORING_PATHS, "/metrics", "/admin/"]},
    "metrics": {"enabled": False},
}


@bentoml.asgi_app(app, path="/")
@bentoml.service(**SERVICE_CONFIG)
class ScoringService:
    """Loads the serving runtime at start; every route is in ``serving.app``."""

    def __init__(self) -> None:
        from adapters.runtime import configure
        from mlops.settings import load_settings
        from serving.bentoml_patches import patch_bentoml_timeout_middleware
        from serving.runtime import ServingRuntime

        patch_bentoml_timeout_middleware()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        settings = load_settings()
        configure(settings)
        name = settings.serving.model_name or settings.training.model_name
        runtime = ServingRuntime.for_model(settings, name)
        loaded = runtime.bootstrap()
        log.info("serving %s: %s", name, loaded)
        _ref.runtime = runtime
        # Move the ~120k start-up objects (bentoml, mlflow, pydantic, otel ...) out of the
        # cyclic GC's reach: full collections then walk only what requests create.
        gc.collect()
        gc.freeze()

    def __is_ready__(self) -> bool:
        return _ref.runtime is not None and _ref.runtime.ready
