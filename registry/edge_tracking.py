"""MLflow logging of an edge export: one run holding the variants' figures, table and chart."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlops.errors import RegistryError
from mlops.settings import Settings
from registry.tracking import ensure_experiment


def log_edge_run(
    settings: Settings,
    *,
    experiment: str,
    run_name: str,
    params: Mapping[str, object],
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    files: Mapping[str, bytes],
) -> str:
    """Create a finished MLflow run with ``metrics`` and ``files`` (under ``edge/``); its run id."""
    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)
    try:
        run = client.create_run(
            ensure_experiment(client, settings, experiment), run_name=run_name, tags=dict(tags)
        )
        run_id = run.info.run_id
        for key, value in params.items():
            client.log_param(run_id, key, str(value)[:6000])
        for key, value in metrics.items():
            client.log_metric(run_id, key, float(value))
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                path = Path(tmp) / name
                path.write_bytes(data)
                client.log_artifact(run_id, str(path), "edge")
        client.set_terminated(run_id)
        return run_id
    except MlflowException as exc:
        raise RegistryError(f"MLflow tracking at {settings.tracking_uri} failed: {exc.message}") from exc
