"""A rollout plan that goes on from the server cutover to the edge fleet (the devices step):
the pure machine, tick by tick, with synthetic server observations and device gates.

The orchestrator's part is played by ``_apply``: a release effect is answered with the
published release's version (``record_release``) before it is marked applied, as the flow
does; every other effect is only marked applied (and collected, to assert on).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from mlops.errors import ConfigError
from mlops.gates import CheckResult, GateResult, Outcome
from mlops.registry_model import CHAMPION, PREVIOUS_CHAMPION
from mlops.rollout import machine as m
from mlops.rollout.errors import RolloutError
from mlops.rollout.observe import Observations, VariantStats
from mlops.rollout.plan import DeviceStep, RolloutPlan, load_plan

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
S, C = 3, 4
ALIASES = {CHAMPION: S, PREVIOUS_CHAMPION: 2, "challenger": C}
RELEASE, LAST_GOOD = 12, 11


def _plan(**devices: object) -> RolloutPlan:
    dev = {"kind": "devices", "budget": "configs/edge/pos-terminal.yaml", "stages": [10, 50, 100]} | devices
    data = {
        "name": "to-devices",
        "tick_interval_s": 5,
        "steps": [
            {"kind": "canary", "weights": [50], "min_samples": 10},
            {"kind": "blue_green", "min_samples": 10},
            dev,
        ],
    }
    return RolloutPlan.model_validate_json(json.dumps(data))


def _obs(status: m.RolloutStatus, now: datetime) -> Observations | None:
    if status.window_start is None:
        return None
    return Observations(
        since=status.window_start,
        until=now,
        stable=VariantStats(version=S, requests=100),
        candidate=VariantStats(version=C, requests=100),
    )


def _gate(outcome: Outcome) -> GateResult:
    return GateResult((CheckResult("failure_rate", outcome, f"failure rate gate: {outcome.value}", 0.0),))


class Orchestrator:
    """Ticks the machine and applies effects, recording every effect applied."""

    def __init__(self, plan: RolloutPlan, last_good: int | None = LAST_GOOD, reload: bool = False) -> None:
        self.plan, self.last_good, self.reload = plan, last_good, reload
        self.status = m.start(
            "r-dev", plan, model_name="fraud", stable_version=S, candidate_version=C, aliases=ALIASES, now=T0
        )
        self.now = T0
        self.applied: list[m.Effect] = []
        self.decisions: list[m.Decision] = []

    def tick(self, gate: GateResult | None = None) -> m.Decision:
        """One tick: observe, decide, persist, apply."""
        if self.reload:
            self.status = m.load_status(m.dump_status(self.status))
        d = m.decide(
            self.status, _obs(self.status, self.now), self.plan, self.now, m.Signals(device_gate=gate)
        )
        self.decisions.append(d)
        self.status = d.status
        for e in d.effects:
            if self.reload:
                self.status = m.load_status(m.dump_status(self.status))
            if e.edge is not None and e.edge.action == "release":
                self.status = m.record_release(self.status, RELEASE, self.last_good)
            self.status = m.mark_applied(self.status, e.key, self.now)
            self.applied.append(e)
        self.now += timedelta(seconds=5)
        return d

    def to_devices(self) -> None:
        """Tick through canary and blue-green until the release is published."""
        for _ in range(10):
            self.tick()
            if any(e.edge is not None and e.edge.action == "release" for e in self.applied):
                return
        raise AssertionError("never reached the devices step")


def test_devices_step_follows_the_cutover_and_widens_cohorts_to_success() -> None:
    """Canary -> blue-green (champion v3 -> v4 by compare-and-set, old slot kept warm) ->
    release published -> cohorts 10/50/100 % each gated on telemetry -> release marked good,
    old slot released, rollout succeeded; one status, one log."""
    o = Orchestrator(_plan())
    o.to_devices()
    assert o.status.phase is m.Phase.PROMOTED
    assert o.status.route.mode == "blue_green" and o.status.route.active_slot == "candidate"
    d = o.tick()  # the release is known: serve the first cohort
    assert [e.edge.percent for e in d.effects if e.edge] == [10.0]
    assert o.tick().action is m.Action.HOLD  # no telemetry yet: hold, nothing served
    for pct in (50.0, 100.0):
        d = o.tick(_gate(Outcome.PASS))
        assert d.action is m.Action.ADVANCE and [e.edge.percent for e in d.effects] == [pct]
    d = o.tick(_gate(Outcome.PASS))
    assert o.status.phase is m.Phase.SUCCEEDED, d.reason
    assert [e.edge.action for e in d.effects if e.edge] == ["mark_good"]
    assert d.effects[0].edge.version == RELEASE
    assert d.effects[-1].route is not None and d.effects[-1].route.candidate_version is None
    assert "every device runs v12" in d.reason and "rollout succeeded" in d.reason
    champion_moves = [a for e in o.applied for a in e.aliases if a.alias == CHAMPION]
    assert [(a.from_version, a.to_version) for a in champion_moves] == [(S, C)]
    steps = [r.step for r in o.status.history]
    assert "devices 10%" in steps and "devices 100%" in steps
    keys = [e.key for e in o.applied]
    assert len(keys) == len(set(keys))


def test_a_failing_device_stage_halts_the_fleet_and_rolls_the_server_back_when_the_plan_says_so() -> None:
    """on_device_failure: rollback_server: the first cohort FAILs -> the fleet is restored to
    the last good release, the champion alias goes back v4 -> v3 by compare-and-set and all
    traffic flips back to the warm old slot, in one decision."""
    o = Orchestrator(_plan(on_device_failure="rollback_server"))
    o.to_devices()
    o.tick()
    d = o.tick(_gate(Outcome.FAIL))
    assert d.action is m.Action.ROLLBACK and o.status.phase is m.Phase.ROLLED_BACK
    kinds = [(e.edge.action, e.edge.version) if e.edge else e.kind for e in d.effects]
    assert kinds == [("restore", LAST_GOOD), "aliases", "route"]
    revert = [a for a in d.effects[1].aliases if a.alias == CHAMPION]
    assert [(a.from_version, a.to_version) for a in revert] == [(C, S)]
    assert d.effects[2].route.mode == "blue_green" and d.effects[2].route.active_slot == "stable"
    assert "failure rate gate: FAIL" in d.reason and "rollback_server" in d.reason
    assert f"aliases restored: champion v{S}" in d.reason


def test_halt_fleet_keeps_the_server_on_the_candidate() -> None:
    """on_device_failure: halt_fleet: a failing stage restores the fleet's last good release,
    the server keeps v4 (old slot released), the rollout ends aborted, saying why."""
    o = Orchestrator(_plan(failure_limit=1))
    o.to_devices()
    o.tick()
    held = o.tick(_gate(Outcome.FAIL))  # within failure_limit 1: observe the cohort again
    assert held.action is m.Action.HOLD and [e.edge.action for e in held.effects] == ["serve_cohort"]
    d = o.tick(_gate(Outcome.FAIL))
    assert o.status.phase is m.Phase.ABORTED and d.action is m.Action.ABORT
    assert [e.edge.action for e in d.effects if e.edge] == ["restore"]
    assert not any(e.aliases for e in d.effects)
    assert d.effects[-1].route.stable_version == C and d.effects[-1].route.candidate_version is None
    assert "halt_fleet" in d.reason and f"v{C} keeps serving all traffic" in d.reason


def test_without_a_good_release_the_fleet_halts_where_it_stands() -> None:
    """No earlier good release: nothing to restore, the halt is recorded as a fleet effect."""
    o = Orchestrator(_plan(on_device_failure="rollback_server"), last_good=None)
    o.to_devices()
    o.tick()
    d = o.tick(_gate(Outcome.FAIL))
    assert d.effects[0].edge.action == "halt" and "no earlier good release" in d.reason
    assert o.status.phase is m.Phase.ROLLED_BACK


def test_an_operator_rollback_during_device_stages_halts_the_fleet_too() -> None:
    """A rollback command while cohorts are being served restores the fleet as well as the server."""
    o = Orchestrator(_plan())
    o.to_devices()
    o.tick()
    d = m.decide(o.status, None, o.plan, o.now, m.Signals(command="rollback"))
    assert [e.edge.action for e in d.effects if e.edge] == ["restore"]
    assert any(e.aliases for e in d.effects) and d.status.phase is m.Phase.ROLLED_BACK


def test_the_same_rollout_resumed_from_its_status_at_every_step_decides_the_same() -> None:
    """Persisting and reloading the status before every decision and every effect changes nothing."""
    gates = [
        None,
        None,
        _gate(Outcome.PASS),
        _gate(Outcome.INCONCLUSIVE),
        _gate(Outcome.PASS),
        _gate(Outcome.PASS),
    ]
    runs = []
    for reload in (False, True):
        o = Orchestrator(_plan(), reload=reload)
        o.to_devices()
        for g in gates:
            o.tick(g)
        runs.append(([(d.action, d.reason) for d in o.decisions], [e.key for e in o.applied], o.status.phase))
    assert runs[0] == runs[1]
    assert runs[0][2] is m.Phase.SUCCEEDED


def test_an_unapplied_cohort_is_asked_for_again_never_twice() -> None:
    """Effects are keyed: after a crash the outstanding cohort is re-applied, not re-decided."""
    o = Orchestrator(_plan())
    o.to_devices()
    d = m.decide(o.status, None, o.plan, o.now)
    pending = m.load_status(m.dump_status(d.status))  # crashed before applying
    again = m.decide(pending, None, o.plan, o.now, m.Signals(device_gate=_gate(Outcome.PASS)))
    assert again.action is m.Action.HOLD and [e.key for e in again.effects] == [e.key for e in d.effects]
    with pytest.raises(RolloutError, match="already published release v12"):
        m.record_release(pending, 13, LAST_GOOD)
    assert m.record_release(pending, RELEASE, LAST_GOOD).device == pending.device


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (
            [
                {"kind": "canary", "weights": [5]},
                {"kind": "devices", "budget": "b.yaml"},
                {"kind": "blue_green"},
            ],
            "optionally followed by one devices step",
        ),
        (
            [
                {"kind": "canary", "weights": [5]},
                {"kind": "blue_green"},
                {"kind": "devices", "budget": "b.yaml"},
                {"kind": "devices", "budget": "b.yaml"},
            ],
            "optionally followed by one devices step",
        ),
        (
            [
                {"kind": "canary", "weights": [5]},
                {"kind": "blue_green"},
                {"kind": "devices", "budget": "b.yaml", "stages": [10, 50]},
            ],
            "end at 100",
        ),
        (
            [
                {"kind": "canary", "weights": [5]},
                {"kind": "blue_green"},
                {"kind": "devices", "budget": "b.yaml", "on_device_failure": "ignore"},
            ],
            "on_device_failure",
        ),
    ],
)
def test_bad_devices_steps_are_refused(tmp_path, steps: list, message: str) -> None:
    """The devices step comes once, right after the cutover, with stages that reach the whole fleet."""
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps({"name": "x", "tick_interval_s": 5, "steps": steps}))
    with pytest.raises(ConfigError, match=message):
        load_plan(path)


def test_a_plan_with_a_devices_step_loads() -> None:
    """Defaults: stages 1/10/50/100 %, halt_fleet, fleet 'default'."""
    step = _plan().steps[-1]
    assert isinstance(step, DeviceStep)
    assert (step.on_device_failure, step.fleet, step.devices) == ("halt_fleet", "default", 1000)


def test_the_report_lists_the_device_stages() -> None:
    """One report: the rollout report gains a Devices section with every cohort's gate."""
    from mlops.rollout.report import render_report

    o = Orchestrator(_plan())
    o.to_devices()
    o.tick()
    o.tick(_gate(Outcome.PASS))
    o.tick(_gate(Outcome.FAIL))
    page = render_report(o.status, o.plan, figures={"traffic.png": b"", "latency.png": b""})
    assert "<h2>Devices</h2>" in page and "release v12 (model v4)" in page
    assert "<td>10%</td><td>advance</td><td>PASS</td>" in page
    assert "<td>50%</td><td>rollback</td><td>FAIL</td>" in page


def test_the_live_view_follows_bandit_and_devices_steps() -> None:
    """``mlops rollout watch`` shows a devices step (which has no traffic gate) and a bandit
    step with the gates the machine measures, not an implicit traffic gate."""
    from mlops_cli.rollout_view import build_view

    o = Orchestrator(_plan())
    o.to_devices()
    o.tick()
    view = build_view(o.status, o.plan, o.now)
    assert view.step.startswith("devices") and "candidate_traffic" not in [g.name for g in view.gates]
    from tests.test_rollout_bandit_step import World, _run
    from tests.test_rollout_bandit_step import _plan as bandit_plan

    plan = bandit_plan()
    status, _ = _run(plan, World(stable_loss=0.10, candidate_loss=0.10), max_ticks=3)
    gates = [g.name for g in build_view(status, plan, T0 + timedelta(seconds=15)).gates]
    assert gates == ["error_rate_vs_stable_diff"]
