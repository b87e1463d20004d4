"""MLflow tracking: experiments, runs, metrics, artifacts and logged ONNX models."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import mlflow
import onnx
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from mlops.errors import RegistryError
from mlops.settings import Settings


def serving_requirements() -> list[str]:
    """Pinned runtime requirements of a logged ONNX model (skips MLflow's slow inference)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("onnx", "onnxruntime", "numpy")]


@dataclass(frozen=True)
class LoggedRun:
    """A logged training run: its id, the URI of its logged ONNX model and its experiment."""

    run_id: str
    model_uri: str
    experiment_id: str


def ensure_experiment(client: MlflowClient, settings: Settings, name: str) -> str:
    """The id of MLflow experiment ``name``, created at the settings' artifact location if missing."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=settings.artifact_location)
    except MlflowException:  # created concurrently by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def log_training_run(
    settings: Settings,
    *,
    run_name: str,
    params: Mapping[str, object],
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    files: Mapping[str, bytes],
    onnx_model: bytes,
    example_features: pd.DataFrame,
    example_scores: pd.DataFrame,
) -> LoggedRun:
    """One MLflow run holding the metrics, plots and ONNX model of a training."""
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.registry_uri)
    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)
    try:
        experiment_id = ensure_experiment(client, settings, settings.training.experiment)
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=dict(tags)) as run:
            mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
            mlflow.log_metrics(dict(metrics))
            with tempfile.TemporaryDirectory() as tmp:
                for name, data in files.items():
                    path = Path(tmp) / name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
                    mlflow.log_artifact(
                        str(path), artifact_path=str(Path("evaluation") / Path(name).parent).rstrip("/.")
                    )
            info = mlflow.onnx.log_model(
                onnx.load_from_string(onnx_model),
                name="model",
                signature=infer_signature(example_features, example_scores),
                save_as_external_data=False,
                onnx_execution_providers=["CPUExecutionProvider"],
                pip_requirements=serving_requirements(),
            )
            return LoggedRun(run.info.run_id, info.model_uri, experiment_id)
    except MlflowException as exc:
        raise RegistryError(f"MLflow tracking at {settings.tracking_uri} failed: {exc.message}") from exc
