"""The platform as users run it: `mlops server up`, `mlops deploy`, runs created through the
Prefect API the way the UI creates them, executed by the process worker, then `server down`."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from adapters.datasets import write_parquet
from adapters.services import free_port
from mlops.datagen import generate
from tests.support.cli import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A running Prefect server + worker + MLflow server for one MLOPS_HOME, stopped afterwards."""
    home = tmp_path_factory.mktemp("e2e") / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLOPS"))}
    env |= {
        "MLOPS_HOME": str(home),
        "MLOPS__SERVICES__PREFECT_PORT": str(free_port()),
        "MLOPS__SERVICES__MLFLOW_PORT": str(free_port()),
        "MLOPS__SERVICES__SERVING_PORT": str(free_port()),
        # Generous: four servers import their stacks at once on a 2-core machine.
        "MLOPS__SERVICES__STARTUP_TIMEOUT_SECONDS": "600",
        "MLOPS__TRAINING__CANDIDATES": '[{"kind": "gradient_boosting", "n_estimators": 20}, {"kind": "logistic_regression"}]',
    }
    up = run_cli(env, "server", "up", timeout=900)
    assert up.returncode == 0, up.stdout + up.stderr
    pids = _recorded_pids(home)
    try:
        yield env
    finally:
        down = run_cli(env, "server", "down")
        assert down.returncode == 0, down.stderr
        time.sleep(1)
        survivors = [
            p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        ]
        assert not survivors, f"processes still running after `server down`: {survivors}"


def _recorded_pids(home: Path) -> list[int]:
    pids = []
    for f in (home / "run").glob("*.pid.json"):
        root = psutil.Process(json.loads(f.read_text())["pid"])
        pids += [root.pid] + [c.pid for c in root.children(recursive=True)]
    return pids


def _api(env: dict[str, str]) -> str:
    return f"http://127.0.0.1:{env['MLOPS__SERVICES__PREFECT_PORT']}/api"


def _run_deployment(env: dict[str, str], name: str, parameters: dict, timeout: float = 900):
    """Create a flow run from a deployment through the API (as the UI does) and wait for a final state."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def run():
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


def test_deployments_register_and_training_runs_on_the_worker(
    platform: dict[str, str], tmp_path: Path
) -> None:
    """`mlops deploy` registers prefect.yaml; a training run created through the API completes on the worker and registers v1.

    The run is given a config whose ``mlflow.tracking_uri`` is the MLflow tracking server
    `server up` started (the scaled-out form): it logs, registers and sets aliases over HTTP,
    and the server answers for the version the embedded SQLite form then lists."""
    import httpx

    deployed = run_cli(platform, "deploy")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "train/train" in deployed.stdout

    data = Path(platform["MLOPS_HOME"]) / "data" / "train.parquet"
    write_parquet([generate(8000, seed=21)], data)
    mlflow_url = f"http://127.0.0.1:{platform['MLOPS__SERVICES__MLFLOW_PORT']}"
    team = tmp_path / "team.yaml"
    team.write_text(f"mlflow:\n  tracking_uri: {mlflow_url}\n")
    flow_run = _run_deployment(platform, "train/train", {"data": str(data), "config": str(team)})
    assert flow_run.state.is_completed(), flow_run.state
    served = httpx.get(
        f"{mlflow_url}/api/2.0/mlflow/registered-models/alias",
        params={"name": "fraud-detector", "alias": "champion"},
    )
    assert served.status_code == 200 and served.json()["model_version"]["version"] == "1", served.text
    run = httpx.get(
        f"{mlflow_url}/api/2.0/mlflow/runs/get", params={"run_id": served.json()["model_version"]["run_id"]}
    )
    assert run.json()["run"]["info"]["status"] == "FINISHED", run.text
    listing = run_cli(platform, "registry", "list", "--json")
    assert [set(v["aliases"]) for v in map(json.loads, listing.stdout.splitlines())] == [
        {"challenger", "champion"}
    ], listing.stdout + listing.stderr
    status = run_cli(platform, "server", "status")
    assert "running" in status.stdout and "stopped" not in status.stdout, status.stdout
    nightly = _read_deployment(platform, "score/nightly-scoring")
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in nightly.schedules] == [
        ("0 2 * * *", "UTC", True)
    ]
    for other in ("edge-export/edge-export", "rollout/rollout"):
        assert _read_deployment(platform, other).work_pool_name == "mlops-process", other
    # the run forms the UI draws from the server's copy of each deployment's parameter schema
    assert {"format": "date", "type": "string"} in nightly.parameter_openapi_schema["properties"]["run_date"][
        "anyOf"
    ]
    candidate = _read_deployment(platform, "rollout/rollout").parameter_openapi_schema["properties"][
        "candidate"
    ]
    assert [o["enum"] for o in candidate["anyOf"] if "enum" in o] == [
        ["champion", "challenger", "previous-champion"]
    ]


def test_a_scoring_run_from_the_nightly_deployment_publishes_the_date_to_duckdb(
    platform: dict[str, str],
) -> None:
    """A run of the nightly-scoring deployment for a given date (as the UI's date picker sends
    it) completes on the worker, and DuckDB holds exactly that day's rows."""
    from datetime import datetime

    day = "2026-01-05"
    data = Path(platform["MLOPS_HOME"]) / "data" / "score" / f"{day}.parquet"
    write_parquet([generate(20_000, seed=41, start=datetime(2026, 1, 5))], data)
    flow_run = _run_deployment(platform, "score/nightly-scoring", {"run_date": day})
    assert flow_run.state.is_completed(), flow_run.state
    counted = run_cli(
        platform,
        "query",
        f"SELECT count(*) AS n, count(DISTINCT transaction_id) AS ids FROM scores WHERE run_date = '{day}'",
    )
    assert counted.returncode == 0 and "│ 20000 │ 20000 │" in counted.stdout, counted.stdout + counted.stderr


E2E_PLAN = """
name: e2e-approval
description: a short shadow, the approval step, a short blue-green cutover (the gates themselves are tested in test_rollout_flow)
tick_interval_s: 1
# the runs roll out older versions against newer champions too: the approval path is under test here
offline_gate: advisory
steps:
  - kind: shadow
    mirror_pct: 100
    duration_s: 3
    min_samples: 30
    checks:
      - {metric: error_rate, relative_to_stable: diff, max: 0.01, min_samples: 30, inconclusive_limit: 120}
  - kind: approval
    timeout_s: TIMEOUT
  - kind: blue_green
    duration_s: 3
    keep_warm_s: 2
    min_samples: 30
    checks:
      - {metric: error_rate, max: 0.01, min_samples: 30, inconclusive_limit: 120}
"""


def test_rollout_runs_pause_for_approval_and_are_approved_rejected_or_time_out(
    platform: dict[str, str], tmp_path: Path
) -> None:
    """Against the served champion, with simulated users: a rollout run created through the API
    reaches Paused at its approval step; `mlops rollout approve` resumes it and it completes
    with champion moved to the challenger. A second run is rejected with `mlops rollout reject
    --reason` and rolls back. A third is not answered: the pause times out at the plan's
    deadline, the rollout ends timed_out and its Prefect run Failed. Champion moved once, by
    the approved run."""
    from adapters.traffic import LiveTraffic
    from mlops.rollout.simulator import SimulatorConfig
    from mlops.settings import load_settings
    from registry.mlflow_registry import ModelRegistry
    from serving.auth import read_feedback_token
    from serving.client import ServingClient

    plan = tmp_path / "e2e.yaml"
    plan.write_text(E2E_PLAN.replace("TIMEOUT", "900"))
    short = tmp_path / "e2e-short-approval.yaml"
    short.write_text(E2E_PLAN.replace("TIMEOUT", "15"))
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(platform)
        settings = load_settings()
        registry = ModelRegistry(settings)
        name = settings.training.model_name
        champion = registry.aliases(name)["champion"]
        url = f"http://127.0.0.1:{platform['MLOPS__SERVICES__SERVING_PORT']}"
        with ServingClient.for_settings(settings, base_url=url) as admin:
            admin.apply({"stable_version": champion})
        outcomes = []
        sim = SimulatorConfig(seed=5, rate_per_s=40, label_delay_s=0.5)
        with LiveTraffic(url, sim, feedback_token=read_feedback_token(settings), max_seconds=1200):
            data = Path(platform["MLOPS_HOME"]) / "data" / "more.parquet"
            write_parquet([generate(8000, seed=31)], data)
            trained = _run_deployment(platform, "train/train", {"data": str(data)})
            assert trained.state.is_completed(), trained.state
            for answer in ("approve", "reject", None):
                # first the new challenger; once it is champion, the old champion by version number
                candidate = (
                    "challenger" if answer == "approve" else str(registry.aliases(name)["previous-champion"])
                )
                challenger = (
                    registry.resolve(name, candidate).version if answer == "approve" else int(candidate)
                )
                run = _create_run(
                    platform,
                    "rollout/rollout",
                    {"plan": str(short if answer is None else plan), "candidate": candidate},
                )
                paused = _wait_state(platform, run.id, "PAUSED")
                assert paused.state.is_paused(), f"{paused.state}: {_rollouts(platform)}"
                if answer is not None:
                    args = ["rollout", answer, str(run.id)] + (
                        ["--reason", "not this week"] if answer == "reject" else []
                    )
                    answered = run_cli(platform, *args)
                    assert answered.returncode == 0, answered.stdout + answered.stderr
                final = _wait_state(platform, run.id, "COMPLETED")
                if (
                    answer is None
                ):  # the run fails, as an expired Prefect pause does (whichever side marks it first:
                    # the server's pause expiry, or the flow's own failure, which the server words the same way)
                    message = final.state.message or ""
                    assert final.state.is_failed(), f"{final.state}: {_rollouts(platform)}"
                    assert "timed out" in message or "never resumed" in message, message
                else:
                    assert final.state.is_completed(), f"{final.state}: {_rollouts(platform)}"
                outcomes.append((champion, challenger, registry.aliases(name)["champion"]))
                champion = registry.aliases(name)["champion"]
    finally:
        os.environ.clear()
        os.environ.update(saved)
    (old, new, after_approve), (old2, _new2, after_reject), (old3, _new3, after_timeout) = outcomes
    assert after_approve == new != old  # approved: champion moved to the challenger
    assert after_reject == old2  # rejected: rolled back, champion unchanged
    assert after_timeout == old3  # nobody answered: timed out, nothing promoted
    listing = _settled_rollouts(platform, count=3)
    phases = [line.split()[1] for line in listing.splitlines() if line.strip()]
    assert phases == ["succeeded", "rolled_back", "timed_out"], listing
    history = [
        m for m in ModelRegistry(settings).history(name) if m.alias == "champion" and m.action == "rollout"
    ]
    assert [(m.from_version, m.to_version) for m in history] == [(old, new)]


def _settled_rollouts(env: dict[str, str], count: int, within_s: float = 20) -> str:
    """The rollout listing once none of ``count`` rollouts is still awaiting approval.

    When nobody answers, the server's pause-expiry service may fail the Prefect run a moment
    before the flow's own wait ends and records ``timed_out``; the record follows within
    seconds (the flow polls every 2 s)."""
    deadline = time.monotonic() + within_s
    while True:
        listing = _rollouts(env)
        lines = [line for line in listing.splitlines() if line.strip()]
        if (len(lines) == count and "awaiting_approval" not in listing) or time.monotonic() > deadline:
            return listing
        time.sleep(1)


def _rollouts(env: dict[str, str]) -> str:
    """`mlops rollout list` (each rollout's phase and last reason), for assertions and their messages."""
    listed = run_cli(env, "rollout", "list")
    return listed.stdout + listed.stderr


def _read_deployment(env: dict[str, str], name: str):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            return await client.read_deployment_by_name(name)

    with temporary_settings({PREFECT_API_URL: _api(env)}):
        return asyncio.run(read())


def _wait_state(env: dict[str, str], flow_run_id, wanted: str, timeout: float = 600):
    """Poll a flow run until its state type is ``wanted`` (or final)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def poll():
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


def _create_run(env: dict[str, str], name: str, parameters: dict):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def create():
        async with get_client() as client:
            deployment = await client.read_deployment_by_name(name)
            return await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)

    with temporary_settings({PREFECT_API_URL: _api(env)}):
        return asyncio.run(create())
