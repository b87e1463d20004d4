"""The platform as users run it: `mlops server up`, `mlops deploy`, runs created through the
Prefect API the way the UI creates them, executed by the process worker, then `server down`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from adapters.datasets import write_parquet
from mlops.datagen import generate

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(2400)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlops(env: dict[str, str], *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mlops_cli.main", *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A running Prefect server + worker + MLflow server for one MLOPS_HOME, stopped afterwards."""
    home = tmp_path_factory.mktemp("e2e") / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLOPS"))}
    env |= {
        "MLOPS_HOME": str(home),
        "MLOPS__SERVICES__PREFECT_PORT": str(_free_port()),
        "MLOPS__SERVICES__MLFLOW_PORT": str(_free_port()),
        "MLOPS__SERVICES__SERVING_PORT": str(_free_port()),
        # Generous: four servers import their stacks at once on a 2-core machine.
        "MLOPS__SERVICES__STARTUP_TIMEOUT_SECONDS": "600",
        "MLOPS__TRAINING__CANDIDATES": '[{"kind": "gradient_boosting", "n_estimators": 20}, {"kind": "logistic_regression"}]',
    }
    up = _mlops(env, "server", "up", timeout=900)
    assert up.returncode == 0, up.stdout + up.stderr
    pids = _recorded_pids(home)
    try:
        yield env
    finally:
        down = _mlops(env, "server", "down")
        assert down.returncode == 0, down.stderr
        time.sleep(1)
        survivors = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not survivors, f"processes still running after `server down`: {survivors}"


def _recorded_pids(home: Path) -> list[int]:
    import json

    pids = []
    for f in (home / "run").glob("*.pid.json"):
        root = psutil.Process(json.loads(f.read_text())["pid"])
        pids += [root.pid] + [c.pid for c in root.children(recursive=True)]
    return pids


def _api(env: dict[str, str]) -> str:
    return f"http://127.0.0.1:{env['MLOPS__SERVICES__PREFECT_PORT']}/api"


def _run_deployment(env: dict[str, str], name: str, parameters: dict, timeout: float = 900):  # noqa: ANN202
    """Create a flow run from a deployment through the API (as the UI does) and wait for a final state."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def run():  # noqa: ANN202
        async with get_client() as client:
            deployment = await client.read_deployment_by_name(name)
            flow_run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                flow_run = await client.read_flow_run(flow_run.id)
                if flow_run.state and flow_run.state.is_final():
                    return flow_run
                await asyncio.sleep(2)
            raise TimeoutError(f"{name} did not finish in {timeout} s (state {flow_run.state})")

    with temporary_settings({PREFECT_API_URL: _api(env)}):
        return asyncio.run(run())


def test_deployments_register_and_training_runs_on_the_worker(platform: dict[str, str], tmp_path: Path) -> None:
    """`mlops deploy` registers prefect.yaml; a training run created through the API completes on the worker and registers v1."""
    deployed = _mlops(platform, "deploy")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "train/train" in deployed.stdout

    data = Path(platform["MLOPS_HOME"]) / "data" / "train.parquet"
    write_parquet([generate(8000, seed=21)], data)
    flow_run = _run_deployment(platform, "train/train", {"data": str(data)})
    assert flow_run.state.is_completed(), flow_run.state
    listing = _mlops(platform, "registry", "list")
    assert "challenger, champion" in listing.stdout, listing.stdout + listing.stderr
    status = _mlops(platform, "server", "status")
    assert "running" in status.stdout and "stopped" not in status.stdout, status.stdout


def _wait_state(env: dict[str, str], flow_run_id, wanted: str, timeout: float = 600):  # noqa: ANN001, ANN202
    """Poll a flow run until its state type is ``wanted`` (or final)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def poll():  # noqa: ANN202
        async with get_client() as client:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                run = await client.read_flow_run(flow_run_id)
                if run.state and (run.state.type.value == wanted or run.state.is_final()):
                    return run
                await asyncio.sleep(1)
            raise TimeoutError(f"flow run {flow_run_id} not {wanted} in {timeout} s (state {run.state})")

    with temporary_settings({PREFECT_API_URL: _api(env)}):
        return asyncio.run(poll())


def _create_run(env: dict[str, str], name: str, parameters: dict):  # noqa: ANN202
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def create():  # noqa: ANN202
        async with get_client() as client:
            deployment = await client.read_deployment_by_name(name)
            return await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)

    with temporary_settings({PREFECT_API_URL: _api(env)}):
        return asyncio.run(create())

