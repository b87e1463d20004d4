"""The rollout flow against the REAL service: a BentoML server on a free loopback port,
reached the way a scaled-out deployment is (``serving.url``; ``services.serving_port`` is
left at its default, where nothing listens), simulated users over HTTP (adapters.traffic),
the MLflow registry on SQLite, real Prefect runs (the session's test harness), and a
compressed copy of the demo plan (1 s ticks, seconds-long steps, small samples).

Versions (all from one small logistic model; pathologies built into the ONNX graph by
``mlops.rollout.degrade``, so the served model itself is slow, erroring or worse):

    v1 champion   logit noise 1.5 (AUC ~0.84)        the model in production
    v2 better     the clean model (AUC ~0.89)
    v3 slower     clean + a 15 ms spin per call (SLOW_MS: several times stable's p95)
    v4 erroring   clean + NaN (HTTP 500) on 5 % of inputs
    v5 worse      logit noise 4 (AUC ~0.71)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapters.services import free_port, http_ok, serving_command, serving_environment, started
from mlops.registry_model import CHAMPION, PREVIOUS_CHAMPION
from mlops.rollout.machine import Phase
from mlops.rollout.simulator import Pathology, SimulatorConfig
from mlops.settings import Settings
from tests.support.serving import configured

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parent.parent
FAST_PLAN = (REPO / "tests/plans/fast-rollout.yaml").read_text()
CANARY_CUTOVER = REPO / "tests/plans/canary-cutover.yaml"  # no analysis before the traffic changes
SHADOW_APPROVAL = REPO / "tests/plans/shadow-approval.yaml"  # straight to the approval step
STRICT_LATENCY = REPO / "tests/plans/strict-latency.yaml"  # the fast plan at p95 <= 2x, p99 <= 3x
FAST_BANDIT = REPO / "tests/plans/fast-bandit.yaml"  # bandit -> approval -> blue-green
RATE = 70.0  # requests/s: the slower candidate can still be mirrored in shadow; 25 frauds take ~30 s
BASE, BETTER, SLOWER, ERRORING, WORSE = 1, 2, 3, 4, 5
SLOW_MS = (
    15.0  # extra ms per model call: ~3x stable's p99 here (more at p50/p95), light enough to mirror in shadow
)


@dataclass
class Live:
    settings: Settings
    env: dict[str, str]
    url: str
    plan: Path
    proc: subprocess.Popen


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, small_model: bytes, mlflow_template: Path
) -> Iterator[Live]:
    """A started service with v1 champion in stable and v2-v5 registered, and its environment."""
    from conftest import register_versions

    from mlops.rollout.degrade import degrade
    from registry.mlflow_registry import ModelRegistry

    root = tmp_path_factory.mktemp("rollout")
    port = free_port()
    overrides = {
        "MLOPS__SERVING__URL": f"http://127.0.0.1:{port}",
        "MLOPS__SERVING__LOG_FLUSH_SECONDS": "0.2",
        # the versions carry no holdout: the offline gate reads their (equal) logged metrics
        "MLOPS__PROMOTION__TRUST_LOGGED_METRICS": "true",
    }
    with configured(root / "home", mlflow_template, overrides) as (settings, env):
        schema = settings.dataset
        models = [
            degrade(small_model, schema, Pathology(extra_noise=1.5)),
            small_model,
            degrade(small_model, schema, Pathology(extra_latency_ms=SLOW_MS)),
            degrade(small_model, schema, Pathology(error_share=0.05)),
            degrade(small_model, schema, Pathology(extra_noise=4.0)),
        ]
        versions = []
        for onnx_model in models:
            # equal offline metrics: each passes the offline promotion gate, the live gates decide
            versions += register_versions(
                settings, onnx_model, [{"roc_auc": 0.8, "pr_auc": 0.2, "log_loss": 0.05}]
            )
        assert versions == [BASE, BETTER, SLOWER, ERRORING, WORSE]
        ModelRegistry(settings).move_alias(
            settings.training.model_name, CHAMPION, BASE, reason="rollout tests"
        )
        from serving.auth import ensure_feedback_token, ensure_token

        ensure_token(settings)
        ensure_feedback_token(settings)
    plan = root / "fast.yaml"
    plan.write_text(FAST_PLAN)
    log = root / "service.log"
    url = f"http://127.0.0.1:{port}"
    argv = serving_command(settings, "127.0.0.1", port)
    ready = http_ok(f"{url}/v2/health/ready")
    service_env = env | serving_environment(settings)
    with started(argv, ready, log, env=service_env, cwd=REPO, name="scoring service") as proc:
        yield Live(settings, env, url, plan, proc)


@pytest.fixture
def world(live: Live, prefect_api: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Live]:
    """The live service back at v1 champion serving alone, this process pointed at it, and
    simulated users sending requests and labels throughout the test."""
    from adapters.traffic import LiveTraffic
    from registry.mlflow_registry import ModelRegistry
    from serving.auth import read_feedback_token
    from serving.client import ServingClient

    for key, value in live.env.items():
        if key.startswith(("MLOPS", "MLFLOW")):
            monkeypatch.setenv(key, value)
    name = live.settings.training.model_name
    registry = ModelRegistry(live.settings)
    if registry.aliases(name).get(CHAMPION) != BASE:
        registry.move_alias(name, CHAMPION, BASE, reason="rollout tests: reset")
    with ServingClient.for_settings(live.settings) as admin:
        admin.apply({"stable_version": BASE})
    cfg = SimulatorConfig(seed=int(time.time()) % 1000, rate_per_s=RATE, label_delay_s=0.5)
    token = read_feedback_token(live.settings)
    with LiveTraffic(live.url, cfg, feedback_token=token, threads=6, max_seconds=900) as traffic:
        live.traffic = traffic  # type: ignore[attr-defined]
        time.sleep(6)  # recent stable traffic for the replay step
        yield live


def _run(world: Live, candidate: int, **kw):
    from flows.rollout import rollout_flow

    return rollout_flow(
        plan=str(kw.pop("plan", world.plan)),
        candidate=str(candidate),
        approval=kw.pop("approval", "approve"),
        max_seconds=kw.pop("max_seconds", 400),
        **kw,
    )


def _status(world: Live, rollout_id: str):
    from tasks.rollout import read_status

    return read_status(world.settings, rollout_id)


def _served(world: Live) -> dict:
    from serving.client import ServingClient

    with ServingClient.for_settings(world.settings) as admin:
        return admin.state()


def _aliases(world: Live) -> dict[str, int]:
    from registry.mlflow_registry import ModelRegistry

    return ModelRegistry(world.settings).aliases(world.settings.training.model_name)


def _steps(status) -> list[str]:
    out: list[str] = []
    for h in status.history:
        if not out or out[-1] != h.step:
            out.append(h.step)
    return out


def test_a_better_candidate_is_promoted_through_every_stage(world: Live) -> None:
    """Given v1 champion and a better v2, when the fast demo plan runs against the live
    service with an approving answer, then v2 goes replay -> shadow -> canary 10/50 -> A/B ->
    approval -> blue-green -> released, champion moves v1 -> v2 once (previous-champion v1,
    in the audited alias history), the service ends serving v2 alone, and the report exists."""
    from registry.mlflow_registry import ModelRegistry

    summary = _run(world, BETTER)
    status = _status(world, summary.rollout_id)
    assert summary.phase == "succeeded", summary.reason
    assert _steps(status) == ["replay", "shadow", "canary 10%", "canary 50%", "ab", "approval", "blue_green"]
    assert {k: v for k, v in _aliases(world).items() if k != "challenger"} == {
        CHAMPION: BETTER,
        PREVIOUS_CHAMPION: BASE,
    }
    moves = [
        m
        for m in ModelRegistry(world.settings).history(world.settings.training.model_name)
        if m.alias == CHAMPION and m.action == "rollout"
    ]
    assert [(m.from_version, m.to_version) for m in moves] == [(BASE, BETTER)]
    served = _served(world)
    assert (served["mode"], served["stable_version"], served["candidate_version"]) == ("single", BETTER, None)
    keys = [a.key for a in status.applied]
    assert len(keys) == len(set(keys))
    assert (
        Path(summary.report).read_text().startswith("<!DOCTYPE html>")
        or "<html" in Path(summary.report).read_text()
    )


def test_a_better_candidate_is_promoted_by_a_bandit_step(world: Live) -> None:
    """Given v1 champion and a better v2, a plan whose experiment is a bandit step: the
    bandit reads each arm's rewards (minus log loss of labelled answers) from the live
    prediction log and feedback, moves sticky traffic towards v2 while judging, declares v2
    the winner, and the plan goes on through approval and blue-green: champion -> v2 once,
    the service ends serving v2 alone, and the report draws the allocation. The stable arm is
    the noisiest version (v5): v1's live log loss is within ~0.006 nats of v2's, too close for
    the plan's samples to tell apart reliably."""
    from registry.mlflow_registry import ModelRegistry
    from serving.client import ServingClient

    name = world.settings.training.model_name
    ModelRegistry(world.settings).move_alias(name, CHAMPION, WORSE, reason="bandit test: stable arm")
    with ServingClient.for_settings(world.settings) as admin:
        admin.apply({"stable_version": WORSE})
    summary = _run(world, BETTER, plan=FAST_BANDIT)
    status = _status(world, summary.rollout_id)
    assert summary.phase == "succeeded", summary.reason
    assert _steps(status) == ["bandit", "approval", "blue_green"]
    won = next(h for h in status.history if "bandit: candidate wins" in h.reason)
    assert "P(best)" in won.reason and "n=" in won.reason
    readings = [h.bandit for h in status.history if h.bandit is not None]
    assert readings[-1].leader == 1 and min(readings[-1].n) >= 300
    assert max(r.weight_pct for r in readings) > 50.0  # traffic moved towards the better arm
    realloc = [a.key for a in status.applied if "/step0.b" in a.key]
    assert realloc, "the bandit re-allocated traffic at least once"
    assert {k: v for k, v in _aliases(world).items() if k != "challenger"} == {
        CHAMPION: BETTER,
        PREVIOUS_CHAMPION: WORSE,
    }
    served = _served(world)
    assert (served["mode"], served["stable_version"], served["candidate_version"]) == ("single", BETTER, None)
    assert 'alt="bandit allocation"' in Path(summary.report).read_text()


EDGE_BUDGET = """
name: test-terminal
device_classes: [pos-terminal]
limits: {max_size_bytes: 1000000, max_latency_p99_ms: 50.0, max_metric_drop: 0.03, max_abs_dp: 0.1, max_mean_dp: 0.01}
eval_rows: 2000
calibration_rows: 256
latency_repeats: 30
fallback_rows: 6000
variants:
  - {kind: baseline, name: float}
"""


def _device_plan(world: Live, tmp_path: Path, on_device_failure: str) -> Path:
    """The canary-cutover plan continued by a devices step: 40 devices, cohorts 25/100 %."""
    budget = tmp_path / "test-terminal.yaml"
    budget.write_text(EDGE_BUDGET)
    devices = (
        "  - kind: devices\n"
        f"    budget: {budget}\n"
        "    stages: [25, 100]\n"
        "    devices: 40\n"
        "    fleet: rollout-test\n"
        f"    on_device_failure: {on_device_failure}\n"
    )
    plan = tmp_path / "to-devices.yaml"
    plan.write_text(CANARY_CUTOVER.read_text().replace("name: canary-cutover", "name: to-devices") + devices)
    return plan


def test_one_plan_takes_a_better_candidate_from_the_server_to_the_devices(
    world: Live, tmp_path: Path
) -> None:
    """Canary -> blue-green (champion v1 -> v2) -> devices: v2 is compressed for the budget,
    published as a signed release and served to 25 % then 100 % of a simulated fleet, each
    cohort gated on its telemetry; the release ends good on every device, the server ends
    serving v2 alone, and the one status and report hold the device stages."""
    from tasks import edge as te

    summary = _run(world, BETTER, plan=_device_plan(world, tmp_path, "rollback_server"))
    status = _status(world, summary.rollout_id)
    assert summary.phase == "succeeded", summary.reason
    assert _steps(status)[-2:] == ["devices 25%", "devices 100%"], _steps(status)
    release = status.device.release_version
    name = world.settings.training.model_name
    assert te.ReleaseRepository(te.paths(world.settings).repo).state(name)["last_good"] == release
    roster = te.fleet_for(world.settings, "rollout-test", te.release_sample(world.settings, name, release))
    assert roster.versions() == {f"v{release}": 40}
    assert _aliases(world)[CHAMPION] == BETTER
    served = _served(world)
    assert (served["mode"], served["stable_version"], served["candidate_version"]) == ("single", BETTER, None)
    assert "devices 100%" in Path(summary.report).read_text()


def test_a_failing_device_stage_rolls_the_server_back_when_the_plan_says_so(
    world: Live, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same plan with device latency gated at an impossible 0.0001 ms: the first cohort
    fails, the fleet is halted (the last good release restored) and, as the plan says
    rollback_server, the champion alias goes back v2 -> v1 and traffic back to v1."""
    monkeypatch.setenv("MLOPS__EDGE__GATES__MAX_LATENCY_P99_MS", "0.0001")
    summary = _run(world, BETTER, plan=_device_plan(world, tmp_path, "rollback_server"))
    status = _status(world, summary.rollout_id)
    assert summary.phase == "rolled_back", summary.reason
    assert status.history[-1].step == "devices 25%", summary.reason
    assert "rollback_server" in summary.reason and "aliases restored" in summary.reason
    assert _aliases(world)[CHAMPION] == BASE
    served = _served(world)
    assert served["stable_version"] == BASE and served.get("active_slot", "stable") == "stable"


def test_a_three_times_slower_candidate_is_rolled_back_at_the_first_canary_analysis(world: Live) -> None:
    """A candidate ~3x slower than stable at p99 (its model spins SLOW_MS per call; queueing
    makes it worse at p50 and p95) passes shadow, where latency is only observed, and is
    rolled back in the first canary step (10 %) on its latency ratio: traffic back on stable
    v1 alone, aliases untouched, the reason names the gate."""
    before = _aliases(world)
    summary = _run(world, SLOWER, plan=STRICT_LATENCY)
    status = _status(world, summary.rollout_id)
    assert summary.phase == "rolled_back", summary.reason
    assert status.history[-1].step == "canary 10%", summary.reason
    assert "latency_p9" in summary.reason
    assert "registry aliases untouched" in summary.reason
    assert _aliases(world) == before
    served = _served(world)
    assert (served["mode"], served["stable_version"]) == ("single", BASE)


def test_a_clearly_worse_candidate_is_stopped_before_promotion(world: Live) -> None:
    """A candidate with AUC ~0.13 below the champion is stopped in shadow or A/B (whichever
    gate sees it first) and never promoted."""
    summary = _run(world, WORSE)
    status = _status(world, summary.rollout_id)
    assert summary.phase == "rolled_back", summary.reason
    assert status.history[-1].step in ("replay", "shadow", "ab"), summary.reason
    assert status.promoted_at is None and _aliases(world)[CHAMPION] == BASE


def test_an_erroring_candidate_is_rolled_back_and_no_stable_user_sees_an_error(world: Live) -> None:
    """A candidate failing on 5 % of inputs is rolled back (its errors show in the replay of
    recent traffic, before any user reaches it); every request a user saw fail was answered
    by the candidate, none by stable."""
    from serving.predlog_store import PredictionLogStore

    summary = _run(world, ERRORING)
    assert summary.phase == "rolled_back", summary.reason
    assert "error_rate" in summary.reason
    failed = dict(world.traffic.failed)  # type: ignore[attr-defined]
    if failed:  # the simulator's ids, carried inside the ids the service issued
        ids = "','".join(failed)
        rows = PredictionLogStore.for_settings(world.settings).query(
            "SELECT DISTINCT variant FROM predictions WHERE role = 'primary' AND status <> 200 AND "
            f"regexp_extract(request_id, '^(.*)\\.[^.]+\\.[^.]+$', 1) IN ('{ids}')"
        )
        assert set(rows["variant"]) <= {"candidate"}
    stable_errors = PredictionLogStore.for_settings(world.settings).query(
        "SELECT count(*) n FROM predictions WHERE role = 'primary' AND variant = 'stable' AND status <> 200"
    )
    assert stable_errors["n"].iloc[0] == 0
    assert _aliases(world)[CHAMPION] == BASE


def _paused_run(timeout: float = 400.0):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            paused = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=paused))
            if runs:
                return runs[0]
            time.sleep(1)
    raise AssertionError("no rollout run reached Paused")


def test_a_rejected_approval_rolls_back_through_the_prefect_pause(world: Live) -> None:
    """The rollout pauses its Prefect run at the approval step (pause_flow_run with an input
    form); an answer for another version is refused and the run pauses again; a rejection
    resumes it and the rollout rolls back with the reason, aliases untouched."""
    from prefect.flow_runs import resume_flow_run

    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(s=_run(world, BETTER, plan=SHADOW_APPROVAL, approval="prefect")),
        daemon=True,
    )
    thread.start()
    run = _paused_run()
    resume_flow_run(run.id, run_input={"approved": True, "version": 99, "by": "mallory"})
    time.sleep(3)
    run = _paused_run()
    resume_flow_run(run.id, run_input={"approved": False, "by": "alice", "comment": "not this week"})
    thread.join(timeout=300)
    summary = result["s"]
    status = _status(world, summary.rollout_id)
    assert summary.phase == "rolled_back" and "rejected by alice (not this week)" in summary.reason
    assert any("approval refused: mallory answered for v99" in h.reason for h in status.history)
    assert _aliases(world)[CHAMPION] == BASE
    assert _served(world)["mode"] == "single"


def test_an_unanswered_approval_times_out_restores_the_route_and_fails_the_run(
    world: Live, tmp_path: Path
) -> None:
    """Nobody answers the paused run, and Prefect's server fails it for its expired pause (as
    its pause-expiry service does, here a moment early) while the flow still waits: at the
    plan's deadline the rollout is still recorded timed_out (not left awaiting approval),
    the candidate leaves the route and nothing is promoted."""
    from prefect import get_client
    from prefect.states import Failed

    from mlops.rollout.errors import ApprovalTimedOut
    from tasks.rollout import list_rollouts

    plan = tmp_path / "short-approval.yaml"
    plan.write_text(SHADOW_APPROVAL.read_text().replace("timeout_s: 120", "timeout_s: 10"))
    result: dict = {}

    def run() -> None:
        try:
            result["s"] = _run(world, BETTER, plan=plan, approval="prefect")
        except ApprovalTimedOut as exc:
            result["e"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    paused = _paused_run()
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(
            paused.id, Failed(message="The flow was paused and never resumed."), force=True
        )
    thread.join(timeout=120)
    assert "timed out" in str(result.get("e")), result
    status = list_rollouts(world.settings)[-1]
    assert status.phase is Phase.TIMED_OUT and not status.outstanding, status.final_reason
    assert "approval of v2 timed out" in (status.final_reason or "")
    served = _served(world)
    assert (served["mode"], served["stable_version"]) == ("single", BASE)
    assert _aliases(world)[CHAMPION] == BASE and status.promoted_at is None


def test_a_rollout_killed_mid_canary_resumes_from_its_persisted_status(world: Live, tmp_path: Path) -> None:
    """A rollout running as its own process (``mlops rollout``) is SIGKILLed once it is in
    canary; ``--resume`` continues at the same step and finishes: every effect key is applied
    once, the champion moved exactly once, and the service's generation grew by exactly the
    number of distinct route changes."""
    from prefect.settings import PREFECT_API_URL

    from registry.mlflow_registry import ModelRegistry

    start_generation = _served(world)["generation"]
    rid = f"killed-{int(time.time())}"
    env = world.env | {
        "MLOPS__PREFECT__API_URL": PREFECT_API_URL.value(),
        "PREFECT_API_URL": PREFECT_API_URL.value(),
    }
    plan = CANARY_CUTOVER  # latency gated loosely: this test is about resuming
    argv = [
        str(Path(sys.executable).with_name("mlops")),
        "rollout",
        "--plan",
        str(plan),
        "--candidate",
        str(BETTER),
        "--id",
        rid,
        "--auto-answer",
        "approve",
    ]
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    status_file = world.settings.home_path / "rollouts" / rid / "status.json"
    deadline = time.monotonic() + 150
    try:
        while time.monotonic() < deadline:
            if status_file.exists():
                data = json.loads(status_file.read_text())
                if data["route"]["mode"] == "canary" and data["step_started_at"]:
                    break
            assert proc.poll() is None, "the rollout process ended before canary"
            time.sleep(0.2)
        else:
            raise AssertionError("the rollout never reached canary")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed = _status(world, rid)
    assert killed.phase is Phase.RUNNING and killed.route.mode == "canary"
    summary = _run(world, BETTER, resume=rid)  # the persisted plan is used
    status = _status(world, rid)
    assert summary.phase == "succeeded", summary.reason
    assert status.history[len(killed.history)].step.startswith("canary")  # resumed where it stopped
    keys = [a.key for a in status.applied]
    assert len(keys) == len(set(keys))
    routes = [a.key for a in status.applied if a.key.endswith("/route")]
    assert _served(world)["generation"] - start_generation == len(routes)
    moves = [
        m
        for m in ModelRegistry(world.settings).history(world.settings.training.model_name)
        if m.alias == CHAMPION and m.reason.startswith(f"rollout {rid}")
    ]
    assert len(moves) == 1


def test_rollback_after_promotion_restores_previous_champion_at_once(world: Live) -> None:
    """After a promoted rollout, ``mlops rollback`` flips serving and aliases back to the
    previous champion in one step, without analysis."""
    from typer.testing import CliRunner

    from mlops_cli.main import app

    summary = _run(world, BETTER, plan=CANARY_CUTOVER)
    assert summary.phase == "succeeded", summary.reason
    result = CliRunner().invoke(app, ["rollback", "--rollout", summary.rollout_id])
    assert result.exit_code == 0, result.output
    status = _status(world, summary.rollout_id)
    assert status.phase is Phase.ROLLED_BACK and "skipping analysis" in status.final_reason
    assert _aliases(world)[CHAMPION] == BASE and _aliases(world)[PREVIOUS_CHAMPION] == BETTER
    served = _served(world)
    assert (served["mode"], served["stable_version"]) == ("single", BASE)
