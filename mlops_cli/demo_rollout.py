"""The demo's last act (steps 6-8): a safe rollout of a better challenger against the live service.

The online service starts as a subprocess on a free loopback port and boots while a second
version is trained on more data (it registers as ``challenger``); simulated users join the
service as soon as it is ready. The rollout flow then runs with the demo plan, shown as a
live view of its persisted status (the view ``mlops rollout watch`` shows). The approval
step is answered automatically (said so on screen and in the decision log): a demo has
nobody to click the form.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import TYPE_CHECKING

from adapters.services import ServiceError, free_port, terminate
from mlops.rollout.plan import RolloutPlan
from mlops.settings import Settings
from mlops_cli.common import console

if TYPE_CHECKING:
    from adapters.traffic import LiveTraffic
    from mlops_cli.demo import DemoSteps

DEMO_PLAN = "configs/rollout/demo-live.yaml"  # relative to the project directory
RATE_PER_S = 200.0
LABEL_DELAY_S = 2.0
READY_TIMEOUT_S = 240.0
CHALLENGER_DATA = 5  # the challenger's data, in multiples of the champion's


def demo_plan(plan: str | None) -> str:
    """The plan file the demo rolls out with: ``plan`` as given, else the bundled demo plan."""
    from adapters.services import project_dir

    return plan if plan else str(project_dir() / DEMO_PLAN)


def replay_need(plan: RolloutPlan) -> int:
    """Champion answers the plan's replay step needs before it can conclude (0 without one)."""
    return max((c.min_samples for s in plan.steps if s.kind == "replay" for c in s.checks), default=0)


class DemoService:
    """The online service as a subprocess, and the simulated users who join it once it is ready.

    ``start`` returns at once: a helper thread polls the service's readiness and starts the
    users when it answers, so the service boots while the caller does other work.
    """

    def __init__(self, settings: Settings, port: int) -> None:
        self.settings, self.port = settings, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = settings.run_dir / "demo-serving.log"
        self.proc: subprocess.Popen | None = None
        self.traffic: LiveTraffic | None = None
        self.ready_after_s: float | None = None
        self.failure: str | None = None
        self._done = threading.Event()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Launch the service process and the thread that starts the users once it is ready."""
        from adapters.services import serving_command, serving_environment, spawn
        from serving.auth import ensure_feedback_token, ensure_token

        ensure_token(self.settings)
        ensure_feedback_token(self.settings)
        self.proc = spawn(
            serving_command(self.settings, "127.0.0.1", self.port),
            self.log,
            env=os.environ | serving_environment(self.settings),
        )
        self._thread = threading.Thread(target=self._users_when_ready, name="demo-service", daemon=True)
        self._thread.start()

    def _users_when_ready(self) -> None:
        from adapters.services import http_ok, wait_ready
        from adapters.traffic import LiveTraffic
        from mlops.rollout.simulator import SimulatorConfig
        from serving.auth import read_feedback_token

        assert self.proc is not None
        started = time.monotonic()
        try:
            try:
                wait_ready(
                    self.proc,
                    http_ok(f"{self.url}/v2/health/ready"),
                    self.log,
                    READY_TIMEOUT_S,
                    name="the demo service",
                    poll=0.5,
                )
            except ServiceError as exc:
                self.failure = f"{exc} (log: {self.log})"
                return
            if self._halt.is_set():
                return
            self.ready_after_s = time.monotonic() - started
            sim = SimulatorConfig(seed=11, rate_per_s=RATE_PER_S, label_delay_s=LABEL_DELAY_S)
            self.traffic = LiveTraffic(
                self.url,
                sim,
                feedback_token=read_feedback_token(self.settings),
                threads=12,
                max_seconds=1800,
            ).start()
        finally:
            self._done.set()

    def wait_ready(self) -> None:
        """Block until the service answers and the users are on it; ``ServiceError`` if it failed."""
        self._done.wait()
        if self.failure is not None or self.traffic is None:
            raise ServiceError(self.failure or "the demo service was stopped before it was ready")

    def answered(self) -> int:
        """Requests the service has answered successfully so far."""
        if self.traffic is None:
            return 0
        return sum(n for (_, status), n in self.traffic.tally.items() if status == 200)

    def wait_answered(self, n: int) -> None:
        """Block until the service has answered ``n`` requests (recent traffic a replay needs)."""
        if self.answered() >= n:
            return
        started = time.monotonic()
        console.print(f"waiting for {n:,} answered requests ({self.answered():,} so far)")
        while self.answered() < n:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServiceError(
                    f"the demo service exited with code {self.proc.returncode}: see {self.log}"
                )
            time.sleep(0.5)
        console.print(f"{self.answered():,} requests answered after {time.monotonic() - started:.0f} s more")

    def stop(self) -> None:
        """Stop the users, then the service process (its whole process group)."""
        self._halt.set()
        if not self._done.is_set() and self.proc is not None:
            terminate(self.proc)  # still booting: its readiness wait ends when it exits
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.traffic is not None:
            self.traffic.stop()
        if self.proc is not None:
            terminate(self.proc)


def run_rollout_demo(
    settings: Settings, config: str | None, rows: int, plan: str | None, steps: DemoSteps
) -> object:
    """Steps 6-8: start the service, train a challenger meanwhile, roll it out with ``plan``
    (default: the bundled demo plan) while simulated users send traffic; the rollout summary."""
    from adapters.datasets import write_parquet
    from flows.rollout import new_rollout_id, rollout_flow
    from flows.train import train_flow
    from mlops.datagen import generate_blocks
    from mlops.rollout.plan import load_plan
    from mlops_cli.main import _print_training
    from mlops_cli.rollout import print_summary, watch_rollout
    from tasks.rollout import utcnow

    plan_path = demo_plan(plan)
    the_plan = load_plan(plan_path)
    port = free_port()
    os.environ["MLOPS__SERVICES__SERVING_PORT"] = str(port)
    os.environ["MLOPS__SERVING__URL"] = (
        f"http://127.0.0.1:{port}"  # the rollout flow talks to the demo's service
    )
    service = DemoService(settings, port)
    try:
        with steps.step(
            f"online service on 127.0.0.1:{port}: boots while the next step runs; simulated users "
            f"(~{RATE_PER_S:g} requests/s, labels ~{LABEL_DELAY_S:g} s later) join once it answers",
            spinner=False,
        ):
            service.start()

        # More data: a bigger training set, and a test set big enough that the promotion
        # gate's comparison with the champion is not decided by which frauds it happened to hold.
        more = settings.data_dir / "train-more.parquet"
        n = CHALLENGER_DATA * rows
        with steps.step(
            f"challenger: training flow on {n:,} new transactions ({CHALLENGER_DATA}x the champion's)"
        ):
            write_parquet(generate_blocks(n, seed=7), more)
            trained = train_flow(str(more), config)
        _print_training(trained)

        rollout_id = new_rollout_id(utcnow())
        with steps.step(
            f"rollout {rollout_id} ({the_plan.name}): replay -> shadow -> canary -> A/B -> approval -> blue-green",
            spinner=False,
        ):
            service.wait_ready()
            need = replay_need(the_plan)
            console.print(
                f"service ready {service.ready_after_s:.0f} s after launch; {service.answered():,} requests "
                f"answered so far (the replay step needs {need:,} recent answers)"
            )
            service.wait_answered(need + int(RATE_PER_S * settings.serving.log_flush_seconds))
            console.print("[yellow]the approval step is answered automatically in the demo (auto-approve)[/]")
            stop = threading.Event()
            view = threading.Thread(
                target=watch_rollout, args=(settings, rollout_id), kwargs={"stop": stop}, daemon=True
            )
            view.start()
            try:
                summary = rollout_flow(
                    plan=plan_path,
                    candidate="challenger",
                    rollout_id=rollout_id,
                    approval="approve",
                    config=config,
                )
            finally:
                stop.set()
                view.join(timeout=10)
        print_summary(summary)
        if service.traffic is not None:
            console.print(f"simulated users saw: {dict(service.traffic.tally)}")
        return summary
    finally:
        service.stop()
