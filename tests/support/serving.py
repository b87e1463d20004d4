"""Serving-test scaffolding: a registry prepared in its own MLOPS_HOME, feature records as a
client sends them, and the service run in this process (Starlette app + ``ServingRuntime``)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pandas as pd

from mlops.settings import DatasetSchema, Settings, load_settings
from tests.support import environ_restored


@contextmanager
def configured(
    home: Path, mlflow_template: Path, overrides: dict[str, str] | None = None, config: Path | None = None
) -> Iterator[tuple[Settings, dict[str, str]]]:
    """Settings of a platform in ``home`` (``config`` or the defaults, fast training settings plus ``overrides``, its MLflow
    store a copy of ``mlflow_template``), configured; yields them with the environment
    ``configure`` produced, and restores ``os.environ`` after (``configure`` writes the
    backends' variables into it)."""
    from adapters.runtime import configure
    from tests.conftest import FAST_ENV, seed_mlflow_store

    seed_mlflow_store(home, mlflow_template)
    with environ_restored():
        os.environ.update(FAST_ENV | {"MLOPS_HOME": str(home)} | (overrides or {}))
        settings = load_settings(config)
        configure(settings)
        yield settings, dict(os.environ)


def champion_registry(
    home: Path,
    mlflow_template: Path,
    small_model: bytes,
    metrics: list[dict[str, float]],
    reason: str,
    overrides: dict[str, str] | None = None,
    config: Path | None = None,
) -> tuple[Settings, dict[str, str], list[int]]:
    """A registry in ``home`` with one version of ``small_model`` per metrics dict and
    ``champion`` at the first; returns its settings, the environment that reaches it, the versions."""
    from registry.mlflow_registry import ModelRegistry
    from tests.conftest import register_versions

    with configured(home, mlflow_template, overrides, config) as (settings, env):
        versions = register_versions(settings, small_model, metrics)
        ModelRegistry(settings).move_alias(
            settings.training.model_name, "champion", versions[0], reason=reason
        )
    return settings, env, versions


def env_reaching(settings: Settings) -> dict[str, str]:
    """The fast settings plus the ``MLOPS__MLFLOW__*`` that point another MLOPS_HOME at the
    registry of ``settings``."""
    from tests.conftest import FAST_ENV

    return FAST_ENV | {
        "MLOPS__MLFLOW__TRACKING_URI": settings.tracking_uri,
        "MLOPS__MLFLOW__AUDIT_DB_URI": settings.audit_db_uri,
    }


def feature_records(frame: pd.DataFrame, schema: DatasetSchema) -> list[dict[str, Any]]:
    """Each row's features as a JSON client sends them: numbers as floats, categories as strings."""
    return [
        {n: (float(r[n]) if n in schema.numeric_names else str(r[n])) for n in schema.feature_names}
        for r in frame.to_dict("records")
    ]


@asynccontextmanager
async def serve_in_process(
    settings: Settings, *, jobs: bool = False
) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """``async with serve_in_process(settings) as (runtime, http)``: bootstrap and start the
    runtime (and the async job queue with ``jobs``, as the app's lifespan does when async jobs
    are on), serve its app through httpx's ASGI transport, and on the way out stop it (which
    flushes the prediction log), as the BentoML service does."""
    from serving.app import RuntimeRef, build_app
    from serving.async_jobs import AsyncJobs
    from serving.auth import ensure_feedback_token, ensure_id_key, ensure_token
    from serving.runtime import ServingRuntime
    from serving.source import RegistrySource

    rt = ServingRuntime(
        settings,
        RegistrySource(settings, settings.serving.model_name or settings.training.model_name),
        token=ensure_token(settings),
        feedback_token=ensure_feedback_token(settings),
        id_key=ensure_id_key(settings),
    )
    await asyncio.to_thread(rt.bootstrap)
    rt.start()
    ref = RuntimeRef(rt)
    if jobs:
        ref.jobs = AsyncJobs(rt)
        await ref.jobs.start()
    transport = httpx.ASGITransport(app=build_app(ref), raise_app_exceptions=False)
    http = httpx.AsyncClient(transport=transport, base_url="http://serving")
    try:
        yield rt, http
    finally:
        await http.aclose()
        if ref.jobs is not None:
            await ref.jobs.stop()
        await rt.stop()


def json_tensors(rows: list[dict[str, Any]], schema: DatasetSchema) -> list[dict[str, Any]]:
    """Feature records as Open Inference Protocol v2 input tensors: one ``[rows, 1]`` tensor a
    feature, FP32 for numbers and BYTES for categories."""
    return [
        {
            "name": n,
            "datatype": "FP32" if n in schema.numeric_names else "BYTES",
            "shape": [len(rows), 1],
            "data": [r[n] for r in rows],
        }
        for n in schema.feature_names
    ]
