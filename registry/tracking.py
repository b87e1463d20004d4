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
            _log_files(client, run.info.run_id, files)
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


def _log_files(client: MlflowClient, run_id: str, files: Mapping[str, bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            client.log_artifact(
                run_id, str(path), artifact_path=str(Path("evaluation") / Path(name).parent).rstrip("/.")
            )


def stored_onnx(settings: Settings, client: MlflowClient, uri: str, what: str) -> bytes:
    """The ONNX file a logged model's ``uri`` (``models:/m-...`` or a run's artifact URI) holds."""
    import mlflow.artifacts

    try:
        if uri.startswith("models:/m-"):
            # A logged model's id is resolved through this registry's own tracking store,
            # not whichever one MLflow's process-wide default points at.
            uri = client.get_logged_model(uri.removeprefix("models:/")).artifact_location
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=uri, dst_path=tmp, tracking_uri=settings.tracking_uri
                )
            )
            found = [local] if local.is_file() else sorted(local.rglob("*.onnx"))
            if not found:
                raise RegistryError(f"{what} has no ONNX file at {uri}")
            return found[0].read_bytes()
    except MlflowException as exc:
        raise RegistryError(f"cannot download {what}: {exc.message}") from exc


def log_evaluation_record(
    settings: Settings, model: str, run: LoggedRun, evidence_tags: Mapping[str, str]
) -> dict[str, str]:
    """Sign the evaluation record of a logged training run, store it in the run, and return the
    tag naming it (the record binds the run, the ONNX file as stored and its evaluation files)."""
    from datetime import UTC, datetime

    from adapters.evaluation_keys import signing_key
    from mlops.evaluation import signed_record

    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)
    onnx_model = stored_onnx(settings, client, run.model_uri, f"the model of run {run.run_id}")
    files, tags = signed_record(
        model, run.run_id, onnx_model, evidence_tags, signing_key(settings), datetime.now(UTC)
    )
    try:
        _log_files(client, run.run_id, files)
    except MlflowException as exc:
        raise RegistryError(f"MLflow tracking at {settings.tracking_uri} failed: {exc.message}") from exc
    return tags
