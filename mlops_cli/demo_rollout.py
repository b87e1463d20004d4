"""The demo's last act: a safe rollout of a better challenger against the live service.

Trains a second version on more data (it registers as challenger), starts the online
service as a subprocess on a free loopback port, sends simulated users to it, and runs the
rollout flow with the demo plan. The approval step is answered automatically (said so on
screen and in the decision log): a demo has nobody to click the form.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import httpx

from mlops.settings import Settings
from mlops_cli.common import console, progress

DEMO_PLAN = "configs/rollout/demo.yaml"  # relative to the project directory
RATE_PER_S = 150.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_service(settings: Settings, port: int) -> subprocess.Popen:
    from adapters.services import project_dir, serving_command, serving_environment
    from serving.auth import ensure_feedback_token, ensure_token

    ensure_token(settings)
    ensure_feedback_token(settings)
    log = settings.run_dir / "demo-serving.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            serving_command(settings, "127.0.0.1", port),
            cwd=project_dir(),
            env=os.environ | serving_environment(settings),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the demo service exited: see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    _stop(proc)
    raise RuntimeError(f"the demo service did not become ready: see {log}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def demo_plan(plan: str | None) -> str:
    """The plan file the demo rolls out with: ``plan`` as given, else the bundled demo plan."""
    from adapters.services import project_dir

    return plan if plan else str(project_dir() / DEMO_PLAN)


def run_rollout_demo(settings: Settings, config: str | None, rows: int, plan: str | None = None) -> object:
    """Train a challenger, serve, simulate users, roll out with ``plan``; the rollout summary."""
    from adapters.datasets import write_parquet
    from adapters.traffic import LiveTraffic
    from flows.rollout import rollout_flow
    from flows.train import train_flow
    from mlops.datagen import generate_blocks
    from mlops.rollout.simulator import SimulatorConfig
    from mlops_cli.main import _print_training
    from mlops_cli.rollout import print_summary
    from serving.auth import read_feedback_token

    more = settings.data_dir / "train-more.parquet"
    with progress(f"rollout 1/3 training a challenger on {2 * rows:,} transactions"):
        write_parquet(generate_blocks(2 * rows, seed=7), more)
        trained = train_flow(str(more), config)
    _print_training(trained)
    port = _free_port()
    os.environ["MLOPS__SERVICES__SERVING_PORT"] = str(port)
    os.environ["MLOPS__SERVING__URL"] = (
        f"http://127.0.0.1:{port}"  # the rollout flow talks to the demo's service
    )
    with progress(f"rollout 2/3 starting the online service on 127.0.0.1:{port}"):
        proc = _start_service(settings, port)
    try:
        sim = SimulatorConfig(seed=11, rate_per_s=RATE_PER_S, label_delay_s=5.0)
        with LiveTraffic(
            f"http://127.0.0.1:{port}",
            sim,
            feedback_token=read_feedback_token(settings),
            threads=8,
            max_seconds=1800,
        ) as traffic:
            console.print(
                f"simulated users: ~{RATE_PER_S:g} requests/s, labels ~5 s later, to http://127.0.0.1:{port}"
            )
            console.print("[yellow]the approval step is answered automatically in the demo (auto-approve)[/]")
            time.sleep(20)  # recent champion traffic for the replay step
            plan = demo_plan(plan)
            with progress(f"rollout 3/3 {plan}: replay -> shadow -> canary -> A/B -> approval -> blue-green"):
                summary = rollout_flow(plan=plan, candidate="challenger", approval="approve", config=config)
        print_summary(summary)
        console.print(f"simulated users saw: {dict(traffic.tally)}")
        return summary
    finally:
        _stop(proc)
