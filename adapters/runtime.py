"""Process-wide wiring of the backends to one ``Settings``, and the source version a run records.

``configure`` is called once by every entry point (the CLI, a deployment's flow, a test session) before
Prefect or MLflow is used; importing this module changes nothing.
"""

from __future__ import annotations

import logging
import os
import subprocess
from importlib import metadata
from pathlib import Path

from mlops.settings import HOME_ENV, Settings


def runtime_environment(settings: Settings) -> dict[str, str]:
    """The environment variables that point Prefect, MLflow and GX at this instance."""
    env = {
        HOME_ENV: str(settings.home_path),
        "PREFECT_HOME": str(settings.prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
        "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
        "PREFECT_LOGGING_LEVEL": settings.prefect.log_level,
        "PREFECT_LOGGING_LOG_PRINTS": "true",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "DO_NOT_TRACK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "MLFLOW_REGISTRY_URI": settings.registry_uri,
        "GX_ANALYTICS_ENABLED": "false",
        "BENTOML_DO_NOT_TRACK": "true",
        "GIT_PYTHON_REFRESH": "quiet",
    }
    if settings.prefect.api_url:
        env["PREFECT_API_URL"] = settings.prefect.api_url
    return env


def configure(settings: Settings) -> None:
    """Apply ``runtime_environment`` to this process and create the state folder."""
    settings.home_path.mkdir(parents=True, exist_ok=True)
    settings.prefect_home.mkdir(parents=True, exist_ok=True)
    os.environ.update(runtime_environment(settings))
    # MLflow warns that it cannot find pip's version for a conda.yaml we never use.
    logging.getLogger("mlflow.utils.environment").setLevel(logging.ERROR)
    if not settings.prefect.api_url:
        os.environ.pop("PREFECT_API_URL", None)


def code_version(root: Path | None = None) -> str:
    """The git commit of the platform's source when run from a checkout, else its version."""
    root = root or Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()

    try:
        sha = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return f"git:{sha}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        try:
            return f"pkg:{metadata.version('mlops-platform')}"
        except metadata.PackageNotFoundError:
            return "unknown"
