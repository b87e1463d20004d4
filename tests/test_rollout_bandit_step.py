"""The bandit rollout step: plan step -> observations -> pure machine, tick by tick.

A synthetic world sends 100 labelled answers per second, split by the candidate weight the
machine last set; each arm's rewards (minus per-answer log loss) are drawn from a normal
around the arm's true mean. Observations are cumulative over the step's window, as the
orchestrator reads them (a re-allocation does not restart the window).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from mlops.registry_model import CHAMPION, PREVIOUS_CHAMPION
from mlops.rollout import machine as m
from mlops.rollout.bandit import ArmStats
from mlops.rollout.observe import Observations, VariantStats, observe
from mlops.rollout.plan import RolloutPlan

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
S, C = 3, 4
ALIASES = {CHAMPION: S, PREVIOUS_CHAMPION: 2, "challenger": C}
TICK = 5.0
RATE = 100.0
SD = 0.25


def _plan(**bandit: object) -> RolloutPlan:
    step = {
        "kind": "bandit",
        "reward": "gaussian",
        "reward_metric": "neg_log_loss",
        "floor": 0.05,
        "threshold": 0.95,
        "max_expected_loss": 0.005,
        "min_samples": 300,
        "confirm_ticks": 2,
        "duration_s": 20,
        "max_duration_s": 300,
        "draws": 2000,
        "checks": [
            {
                "metric": "error_rate",
                "relative_to_stable": "diff",
                "max": 0.01,
                "min_samples": 200,
                "failure_limit": 1,
                "inconclusive_limit": 100,
            }
        ],
    } | bandit
    data = {
        "name": "bandit-test",
        "tick_interval_s": TICK,
        "steps": [step, {"kind": "blue_green", "min_samples": 10}],
    }
    return RolloutPlan.model_validate_json(json.dumps(data))


@dataclass
class World:
    """Cumulative rewards and answers of both arms since the bandit step started."""

    stable_loss: float = 0.10
    candidate_loss: float = 0.10
    candidate_error_rate: float = 0.0
    seed: int = 0
    stats: list[ArmStats] = field(default_factory=lambda: [ArmStats(), ArmStats()])
    requests: list[int] = field(default_factory=lambda: [0, 0])
    errors: list[int] = field(default_factory=lambda: [0, 0])
    ticks: int = 0

    def observe(self, status: m.RolloutStatus, now: datetime) -> Observations | None:
        """This tick's observations: one more tick of traffic under the current route."""
        if status.window_start is None:
            return None
        r = status.route
        share = r.weight_pct / 100 if r.mode == "canary" else r.candidate_pct / 100
        rng = np.random.default_rng([self.seed, self.ticks])
        self.ticks += 1
        total = int(RATE * TICK)
        n_c = int(round(total * share))
        for arm, n, loss in ((0, total - n_c, self.stable_loss), (1, n_c, self.candidate_loss)):
            self.stats[arm] = self.stats[arm] + ArmStats.of(-rng.normal(loss, SD, n))
            self.requests[arm] += n
        self.errors[1] += int(round(n_c * self.candidate_error_rate))
        return Observations(
            since=status.window_start,
            until=now,
            stable=VariantStats(version=S, requests=self.requests[0], errors=self.errors[0]),
            candidate=VariantStats(version=C, requests=self.requests[1], errors=self.errors[1]),
            rewards=(self.stats[0], self.stats[1]),
        )


def _start(plan: RolloutPlan, rid: str = "r-bandit") -> m.RolloutStatus:
    return m.start(
        rid, plan, model_name="fraud", stable_version=S, candidate_version=C, aliases=ALIASES, now=T0
    )


def _run(
    plan: RolloutPlan,
    world: World,
    *,
    rid: str = "r-bandit",
    max_ticks: int = 80,
    reload: bool = False,
    until_step_leaves: bool = True,
) -> tuple[m.RolloutStatus, list[m.Decision]]:
    """Tick the rollout until it leaves the bandit step (or ends); apply effects at once.

    ``reload``: persist and reload the status every tick, and decide every tick twice as an
    orchestrator killed after deciding (before persisting) would, keeping the second answer.
    """
    status = _start(plan, rid)
    now = T0
    decisions = []
    for _ in range(max_ticks):
        obs = world.observe(status, now) if status.phase is not m.Phase.PENDING else None
        if reload:
            status = m.load_status(m.dump_status(status))
            first = m.decide(status, obs, plan, now)
            status = m.load_status(m.dump_status(status))
            d = m.decide(status, obs, plan, now)
            assert d.status == first.status and d.effects == first.effects
        else:
            d = m.decide(status, obs, plan, now)
        decisions.append(d)
        status = d.status
        for e in d.effects:
            status = m.mark_applied(status, e.key, now)
        if status.terminal or (until_step_leaves and status.step_index > 0):
            break
        now += timedelta(seconds=TICK)
    return status, decisions


def test_a_better_candidate_wins_gains_traffic_and_the_plan_advances_to_the_cutover() -> None:
    """Candidate loss 0.06 against stable 0.10: the bandit moves traffic to it while judging,
    and a confirmed win after the minimum duration completes the step: the next step (the
    blue-green cutover) promotes through the compare-and-set alias effect."""
    plan = _plan()
    status, ds = _run(plan, World(stable_loss=0.10, candidate_loss=0.06))
    assert status.step_index == 1 and status.phase is m.Phase.PROMOTED
    last = ds[-1]
    assert last.action is m.Action.PROMOTE
    assert "candidate wins" in last.reason and "P(best)" in last.reason and "n=" in last.reason
    weights = [d.status.route.weight_pct for d in ds if d.status.route.mode == "canary"]
    assert max(weights) > 80.0  # the better arm got most of the traffic before the end
    realloc = [e for d in ds for e in d.effects if ".b" in e.key]
    assert realloc and all(not e.restarts_window for e in realloc)
    # the analysis window ran from the step's start through every re-allocation
    entered = next(d for d in ds if d.effects and d.effects[0].key.endswith("/step0/route"))
    assert all(d.status.step_started_at == T0 for d in ds[1:-1])
    assert entered.status.route.weight_pct == 50.0
    aliases = [e for e in last.effects if e.kind == "aliases"]
    moves = {(a.alias, a.from_version, a.to_version) for e in aliases for a in e.aliases}
    assert (CHAMPION, S, C) in moves
    assert last.status.bandit is not None and last.status.bandit.leader == 1


def test_a_worse_candidate_loses_and_rolls_back_with_the_numbers() -> None:
    """Candidate loss 0.14 against stable 0.10: traffic drains from it and a confirmed stable
    win rolls back, all traffic to stable, aliases untouched, the reason carrying the numbers."""
    status, ds = _run(_plan(), World(stable_loss=0.10, candidate_loss=0.14))
    assert status.phase is m.Phase.ROLLED_BACK
    last = ds[-1]
    assert last.action is m.Action.ROLLBACK
    assert "stable wins" in last.reason and "registry aliases untouched" in last.reason
    assert re.search(r"stable mean neg_log_loss -0\.0\d+ \(n=\d+, P\(best\) 0\.9\d+", last.reason)
    assert re.search(r"candidate mean neg_log_loss -0\.1\d+ \(n=\d+, P\(best\) 0\.0\d+", last.reason)
    assert "stable best with P 0.9" in last.reason
    assert status.route.mode == "single"
    assert min(d.status.route.weight_pct for d in ds if d.status.route.mode == "canary") < 20.0


def test_a_guardrail_trip_rolls_back_even_when_the_candidate_is_winning() -> None:
    """A candidate better on the reward but failing 5 % of requests: the error-rate
    guardrail trips (failure_limit 1) and rolls back before any promotion."""
    world = World(stable_loss=0.10, candidate_loss=0.06, candidate_error_rate=0.05)
    status, ds = _run(_plan(), world)
    assert status.phase is m.Phase.ROLLED_BACK
    assert "error_rate_vs_stable_diff" in ds[-1].reason and "failures 2 > limit 1" in ds[-1].reason
    assert not any(d.action is m.Action.PROMOTE for d in ds)


def test_no_winner_within_max_duration_rolls_back() -> None:
    """Equal arms: nobody reaches P(best) 0.95, and at max_duration_s the step rolls back."""
    plan = _plan(max_duration_s=60, duration_s=10)
    status, ds = _run(plan, World(stable_loss=0.10, candidate_loss=0.10))
    assert status.phase is m.Phase.ROLLED_BACK
    assert "no winner within max_duration_s 60" in ds[-1].reason
    assert "P(best)" in ds[-1].reason


def test_the_floor_keeps_both_arms_served() -> None:
    """However sure the bandit is, neither arm drops below the floor while judging."""
    plan = _plan(floor=0.1, threshold=0.999, max_expected_loss=0.0, max_duration_s=120)
    status, ds = _run(plan, World(stable_loss=0.10, candidate_loss=0.30))
    weights = [d.status.route.weight_pct for d in ds if d.status.route.mode == "canary"]
    assert min(weights) == pytest.approx(10.0, abs=0.5)
    assert max(weights) <= 90.0


def test_a_resumed_rollout_decides_the_same() -> None:
    """Persisting and reloading the status every tick, and deciding each tick twice (as an
    orchestrator killed after a decision would), gives the same rollout as one run: the
    posterior draws are seeded by the rollout id, the step and the tick."""
    plan = _plan()
    once, a = _run(plan, World(stable_loss=0.10, candidate_loss=0.07, seed=4))
    again, b = _run(plan, World(stable_loss=0.10, candidate_loss=0.07, seed=4), reload=True)
    assert [(d.action, d.reason) for d in a] == [(d.action, d.reason) for d in b]
    assert once.history == again.history
    assert m.bandit_seed("r-bandit", 0, 3) == m.bandit_seed("r-bandit", 0, 3)
    assert len({m.bandit_seed("r-bandit", 0, t) for t in range(50)}) == 50
    assert m.bandit_seed("r-bandit", 0, 3) != m.bandit_seed("r-other", 0, 3)


def test_an_outstanding_reallocation_is_not_repeated() -> None:
    """A re-allocation is a keyed route effect: until it is applied the machine only asks
    for it again, and once applied it is never emitted again."""
    plan = _plan()
    world = World(stable_loss=0.10, candidate_loss=0.06)
    status = _start(plan)
    now = T0
    d = m.decide(status, None, plan, now)
    status = m.mark_applied(d.status, d.effects[0].key, now)
    for _ in range(10):
        now += timedelta(seconds=TICK)
        d = m.decide(status, world.observe(status, now), plan, now)
        if d.effects:
            break
        status = d.status
    key = d.effects[0].key
    assert ".b" in key
    held = m.decide(d.status, world.observe(d.status, now), plan, now)
    assert held.action is m.Action.HOLD and [e.key for e in held.effects] == [key]
    status = m.mark_applied(d.status, key, now)
    assert status.step_started_at == T0  # the step's window is kept
    later = m.decide(status, world.observe(status, now), plan, now + timedelta(seconds=TICK))
    assert key not in [e.key for e in later.effects]


def test_observe_condenses_rewards_per_arm_and_leaves_forced_answers_out() -> None:
    """observe(reward=...) turns labelled primary answers into each arm's reward statistics:
    minus the log loss, or 1/0 for a correct decision; rows whose variant was forced by the
    caller (a ``forced`` column) are excluded, shadow rows too."""
    rows = []
    labels = []
    specs = [  # variant, version, score, decision, label, forced, role
        ("stable", S, 0.2, False, 0, False, "primary"),
        ("stable", S, 0.9, True, 1, False, "primary"),
        ("stable", S, 0.7, True, 0, True, "primary"),  # forced: excluded
        ("candidate", C, 0.1, False, 0, False, "primary"),
        ("candidate", C, 0.6, True, 1, False, "primary"),
        ("candidate", C, 0.4, False, 1, False, "primary"),
        ("candidate", C, 0.99, True, 0, True, "primary"),  # forced: excluded
        ("candidate", C, 0.5, True, 1, False, "shadow"),  # shadow: excluded
    ]
    for i, (variant, version, score, decision, label, forced, role) in enumerate(specs):
        rows.append(
            {
                "request_id": f"q{i}",
                "ts": T0 + timedelta(seconds=i),
                "entity_key": f"u{i}",
                "variant": variant,
                "role": role,
                "model_name": "fraud",
                "model_version": version,
                "score": score,
                "decision": decision,
                "latency_ms": 5.0,
                "status": 200,
                "forced": forced,
            }
        )
        labels.append({"request_id": f"q{i}", "label": label})
    log, fb = pd.DataFrame(rows), pd.DataFrame(labels)
    loss = lambda y, p: -(y * np.log(p) + (1 - y) * np.log(1 - p))  # noqa: E731
    obs = observe(log, fb, stable_version=S, candidate_version=C, reward="neg_log_loss")
    assert obs.rewards is not None and obs.forced == 2
    st, ca = obs.rewards
    assert st.n == 2 and st.total == pytest.approx(-(loss(0, 0.2) + loss(1, 0.9)))
    assert ca.n == 3 and ca.total == pytest.approx(-(loss(0, 0.1) + loss(1, 0.6) + loss(1, 0.4)))
    correct = observe(log, fb, stable_version=S, candidate_version=C, reward="correct").rewards
    assert correct is not None and (correct[0].n, correct[0].total) == (2, 2.0)
    assert (correct[1].n, correct[1].total) == (3, 2.0)
    no_column = observe(
        log.drop(columns="forced"), fb, stable_version=S, candidate_version=C, reward="correct"
    )
    assert no_column.rewards is not None and no_column.rewards[1].n == 4 and no_column.forced == 0
    assert observe(log, fb, stable_version=S, candidate_version=C).rewards is None


def test_the_report_shows_the_bandit_allocation() -> None:
    """The rollout report draws P(candidate best) and the candidate's weight per tick, and
    every bandit decision of the log keeps its numbers."""
    from mlops.rollout.report import render_report, report_figures

    plan = _plan()
    status, _ = _run(plan, World(stable_loss=0.10, candidate_loss=0.06))
    figs = report_figures(status, plan)
    assert "bandit.png" in figs
    page = render_report(status, plan, figures=figs)
    assert 'alt="bandit allocation"' in page
    readings = [r.bandit for r in status.history if r.bandit is not None]
    assert len(readings) >= 3 and readings[-1].leader == 1 and readings[-1].n[1] >= 300
