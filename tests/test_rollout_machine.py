"""The rollout state machine (mlops.rollout.machine), tick by tick, on synthetic observations.

Each acceptance case of the safe-rollout issue is driven through ``decide`` with the demo
plan (configs/rollout/demo.yaml) and a synthetic world: 200 requests/s, the candidate's
share of them given by the route the machine last set, labels on 80 % of answers, and a
fake router and registry that apply effects the way the orchestrator will.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from mlops.gates import Outcome
from mlops.registry_model import CHAMPION, PREVIOUS_CHAMPION
from mlops.rollout import machine as m
from mlops.rollout import plan as p
from mlops.rollout.abtest import Arm, Arms
from mlops.rollout.errors import ObservationMismatch, PlanMismatch, RolloutError, StatusFormatError
from mlops.rollout.observe import Observations, PairStats, VariantStats

REPO = Path(__file__).resolve().parent.parent
DEMO = p.load_plan(REPO / "configs/rollout/demo.yaml")  # its A/B asks for non-inferiority


def _superiority(plan: p.RolloutPlan, mde: float = 0.012) -> p.RolloutPlan:
    """``plan`` with an A/B that must find a winner (superiority at ``mde``)."""
    steps = tuple(
        s.model_copy(
            update={"primary": s.primary.model_copy(update={"hypothesis": "superiority", "mde": mde})}
        )
        if isinstance(s, p.ABStep)
        else s
        for s in plan.steps
    )
    return plan.model_copy(update={"steps": steps})


DEMO_SUPERIORITY = _superiority(DEMO)
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
S, C = 3, 4  # stable (champion) and candidate versions
ALIASES = {CHAMPION: S, PREVIOUS_CHAMPION: 2, "challenger": C}
RATE = 200.0
LOSS_SD = 0.28


@dataclass
class Candidate:
    """How the synthetic candidate behaves, relative to a stable model with p99 12 ms,
    no errors, AUC 0.95 and mean per-request log loss 0.030."""

    p99_factor: float = 1.0
    error_rate: float = 0.0
    auc: float = 0.95
    loss: float = 0.030
    starved: tuple[str, ...] = ()  # route modes in which the candidate receives no request
    seed: int = 0
    _ab: dict = field(default_factory=dict)

    def _arm(self, key: str, n: int, mean: float) -> Arm:
        """An arm whose running mean moves like a real one: increments drawn per tick."""
        rng, total, seen = self._ab.get(key, (np.random.default_rng([self.seed, len(key)]), 0.0, 0))
        if n > seen:
            total += rng.normal((n - seen) * mean, LOSS_SD * math.sqrt(n - seen))
        self._ab[key] = (rng, total, max(n, seen))
        return Arm(n, total / n, LOSS_SD**2) if n else Arm()

    def __call__(self, plan: p.RolloutPlan, status: m.RolloutStatus, now: datetime) -> Observations | None:
        if plan.steps[status.step_index].kind == "replay":
            return Observations(
                source="replay",
                pairs=PairStats(4000, 0.99, 0.9, 0.01),
                stable=VariantStats(version=S, requests=4000, score_psi=0.01),
                candidate=VariantStats(version=C, requests=4000, score_psi=0.02),
            )
        if status.window_start is None:
            return None
        seconds = (now - status.window_start).total_seconds()
        r = status.route
        total = RATE * seconds
        share = {"shadow": r.mirror_pct, "canary": r.weight_pct, "ab": r.weight_pct}.get(
            r.mode, r.candidate_pct
        ) / 100
        share = 0.0 if r.mode in self.starved else share
        n_cand = int(total * share)
        n_stable = int(total * (1 - share)) if r.mode in ("canary", "ab", "blue_green") else int(total)
        if r.mode == "blue_green":
            n_stable = 0 if r.active_slot == "candidate" else int(total)
        stable = VariantStats(
            version=S,
            requests=n_stable,
            entities=int(n_stable / 20),
            latency_p50_ms=6.0,
            latency_p95_ms=10.0,
            latency_p99_ms=12.0,
            labelled=int(0.8 * n_stable),
            positives=int(0.008 * n_stable),
            auc=0.95,
            log_loss=0.03,
            decision_rate=0.02,
        )
        cand = VariantStats(
            version=C,
            requests=n_cand,
            errors=round(n_cand * self.error_rate),
            entities=int(n_cand / 20),
            latency_p50_ms=6.0 * self.p99_factor,
            latency_p95_ms=10.0 * self.p99_factor,
            latency_p99_ms=12.0 * self.p99_factor,
            labelled=int(0.8 * n_cand),
            positives=int(0.008 * n_cand),
            auc=self.auc,
            log_loss=self.loss,
            decision_rate=0.02,
            score_psi=0.01,
            input_psi=0.02,
        )
        pairs = PairStats(n_cand, 0.99, 0.9, 0.01) if r.mode == "shadow" else PairStats()
        ab = None
        if r.mode == "ab":
            ns, nc = int(0.8 * n_stable), int(0.8 * n_cand)
            ab = Arms(
                "log_loss",
                self._arm("stable", ns, 0.030),
                self._arm("candidate", nc, self.loss),
                stable.entities,
                cand.entities,
            )
        return Observations(
            since=status.window_start, until=now, stable=stable, candidate=cand, pairs=pairs, ab=ab
        )


class World:
    """Fake router and registry: applies effects like the orchestrator's adapters, with
    compare-and-set alias moves, and remembers every change."""

    def __init__(self) -> None:
        self.routes: list[m.RouteSpec] = []
        self.aliases: dict[str, int] = dict(ALIASES)
        self.keys: list[str] = []

    def apply(self, effect: m.Effect) -> None:
        self.keys.append(effect.key)
        if effect.route is not None and (not self.routes or self.routes[-1] != effect.route):
            self.routes.append(effect.route)
        for move in effect.aliases:
            now = self.aliases.get(move.alias)
            if now == move.to_version:
                continue  # a repeat finds the alias at its target
            assert now == move.from_version, (
                f"compare-and-set: {move.alias} is {now}, expected {move.from_version}"
            )
            if move.to_version is None:
                self.aliases.pop(move.alias)
            else:
                self.aliases[move.alias] = move.to_version


@dataclass
class Run:
    status: m.RolloutStatus
    decisions: list[m.Decision]
    world: World

    def actions(self) -> list[str]:
        return [d.action.value for d in self.decisions if d.action is not m.Action.HOLD]

    def first(self, action: m.Action) -> m.Decision:
        return next(d for d in self.decisions if d.action is action)


Answer = Callable[[m.RolloutStatus, datetime], m.Signals | None]
Feed = Callable[[p.RolloutPlan, m.RolloutStatus, datetime], Observations | None]


def approve(status: m.RolloutStatus, now: datetime) -> m.Signals | None:
    if status.phase is m.Phase.AWAITING_APPROVAL:
        return m.Signals(approval=m.ApprovalResponse(approved=True, version=C, by="alice"))
    return None


def run(
    plan: p.RolloutPlan,
    feed: Feed,
    answer: Answer | None = approve,
    *,
    ticks: int = 600,
    until: Callable[[m.RolloutStatus], bool] | None = None,
    now: datetime = T0,
) -> Run:
    """Tick until the rollout ends (or ``until``): observe, decide, apply each effect, record it."""
    status = m.start(
        "r-7", plan, model_name="fraud", stable_version=S, candidate_version=C, aliases=ALIASES, now=now
    )
    world = World()
    decisions = []
    for _ in range(ticks):
        now += timedelta(seconds=plan.tick_interval_s)
        d = m.decide(status, feed(plan, status, now), plan, now, answer(status, now) if answer else None)
        status = d.status
        for effect in d.effects:
            world.apply(effect)
            status = m.mark_applied(status, effect.key, now)
        decisions.append(d)
        if status.terminal or (until and until(status)):
            break
    return Run(status, decisions, world)


def _modes(world: World) -> list[str]:
    out = []
    for r in world.routes:
        if r.mode in ("canary", "ab"):
            out.append(f"{r.mode} {r.weight_pct:g}")
        elif r.mode == "shadow":
            out.append(f"shadow {r.mirror_pct:g}")
        elif r.mode == "blue_green":
            out.append(f"blue_green {r.active_slot}")
        else:
            out.append(f"single v{r.stable_version}")
    return out


def _with_step(plan: p.RolloutPlan, index: int, **update: object) -> p.RolloutPlan:
    steps = list(plan.steps)
    steps[index] = steps[index].model_copy(update=update)
    return plan.model_copy(update={"steps": tuple(steps), "name": f"{plan.name}-variant"})


# --------------------------------------------------------------------------- acceptance cases


def test_better_candidate_is_promoted_through_every_stage() -> None:
    """Given a candidate with lower log loss and otherwise equal numbers, when the demo plan
    runs with an approving human, then it goes replay -> shadow -> canary 1/5/25/50 -> A/B
    -> approval -> blue-green -> released, the A/B winner is declared only on a powered
    sample, the aliases move once (champion v4, previous-champion v3) and no effect key is
    ever applied twice."""
    r = run(DEMO, Candidate(loss=0.015))
    assert r.status.phase is m.Phase.SUCCEEDED, r.status.history[-1].reason
    assert _modes(r.world) == [
        "shadow 100",
        "canary 1",
        "canary 5",
        "canary 25",
        "canary 50",
        "ab 50",
        "blue_green candidate",
        "single v4",
    ]
    assert r.actions() == ["advance"] * 7 + ["await_approval", "promote", "advance"]
    assert r.world.aliases == {CHAMPION: C, PREVIOUS_CHAMPION: S, "challenger": C}
    promote = r.first(m.Action.PROMOTE).effects[0]
    assert [(c.alias, c.from_version, c.to_version) for c in promote.aliases if not c.implied] == [
        (CHAMPION, S, C)
    ]
    assert len(r.world.keys) == len(set(r.world.keys))
    ab_pass = next(h for h in r.status.history if h.action is m.Action.AWAIT_APPROVAL)
    assert ab_pass.ab is not None and ab_pass.ab.outcome is Outcome.PASS
    assert min(ab_pass.ab.n_stable, ab_pass.ab.n_candidate) >= ab_pass.ab.n_required
    assert "candidate not worse by more than the mde" in ab_pass.reason  # the demo plan's hypothesis
    final = r.status.route
    assert (final.mode, final.stable_version, final.candidate_version) == ("single", C, None)


def test_three_times_slower_candidate_is_rolled_back_at_the_first_canary_analysis() -> None:
    """Given a candidate with 3x the p99 latency, then shadow only observes it (that check
    is a dry run there) and the first canary weight rolls it back: 100 % to stable in the
    tick its failures exceed the limit, aliases untouched, the reason with the numbers."""
    r = run(DEMO, Candidate(p99_factor=3.0))
    assert r.status.phase is m.Phase.ROLLED_BACK
    back = r.first(m.Action.ROLLBACK)
    assert back.status.history[-1].step == "canary 1%"
    assert (
        "latency_p95_ms_vs_stable_ratio: candidate 30.0ms / stable 10.0ms = 3.00x > max 1.50x" in back.reason
    )
    assert (
        "latency_p99_ms_vs_stable_ratio: candidate 36.0ms / stable 12.0ms = 3.00x > max 2.50x" in back.reason
    )
    assert "(failures 2 > limit 1)" in back.reason and "registry aliases untouched" in back.reason
    assert back.route is not None and back.route.mode.value == "single"
    assert _modes(r.world) == ["shadow 100", "canary 1", "single v3"]
    assert r.world.aliases == ALIASES
    # the tick before, the check had failed once, within its limit
    before = r.decisions[r.decisions.index(back) - 1]
    assert before.action is m.Action.HOLD
    assert before.status.counters["latency_p95_ms_vs_stable_ratio"].failures == 1
    assert before.status.counters["latency_p99_ms_vs_stable_ratio"].failures == 1
    shadow_notes = [h.reason for h in r.status.history if h.step == "shadow"]
    assert any(
        "dry-run, not acted on: would rollback: latency_p99_ms_vs_stable_ratio" in t for t in shadow_notes
    )


def test_clearly_worse_auc_is_stopped_in_shadow() -> None:
    """Given a candidate whose AUC is 0.15 below stable's, then shadow rolls it back once
    enough labelled answers exist; it never takes live traffic and is never promoted."""
    r = run(DEMO, Candidate(auc=0.80))
    assert r.status.phase is m.Phase.ROLLED_BACK
    back = r.first(m.Action.ROLLBACK)
    assert back.status.history[-1].step == "shadow"
    assert "auc_vs_stable_diff: candidate 0.8 - stable 0.95 = -0.15 < min -0.03" in back.reason
    assert _modes(r.world) == ["shadow 100", "single v3"] and r.world.aliases == ALIASES


def test_clearly_worse_candidate_is_stopped_by_the_ab_test_when_shadow_cannot_tell() -> None:
    """Given a plan whose shadow step checks no quality, and a candidate with a much worse
    log loss, then the A/B primary test finds it significantly worse and rolls it back."""
    shadow = DEMO.steps[1]
    assert isinstance(shadow, p.ShadowStep)
    plan = _with_step(DEMO, 1, checks=tuple(c for c in shadow.checks if c.metric != "auc"))
    r = run(plan, Candidate(auc=0.80, loss=0.06))
    assert r.status.phase is m.Phase.ROLLED_BACK
    back = r.first(m.Action.ROLLBACK)
    assert back.status.history[-1].step == "ab" and "candidate significantly worse" in back.reason
    assert r.world.aliases == ALIASES and "blue_green candidate" not in _modes(r.world)


def test_candidate_erroring_on_five_percent_of_requests_is_rolled_back() -> None:
    """Given a candidate failing 5 % of its calls, then the error-rate check rolls it back
    as soon as it has its minimum sample, with the rates in the reason."""
    r = run(DEMO, Candidate(error_rate=0.05))
    assert r.status.phase is m.Phase.ROLLED_BACK
    back = r.first(m.Action.ROLLBACK)
    assert "error_rate_vs_stable_diff: candidate 0.05 - stable 0 = +0.05 > max +0.01" in back.reason
    assert r.world.aliases == ALIASES and r.world.routes[-1].mode == "single"


def test_rejected_approval_rolls_back_and_approved_one_proceeds() -> None:
    """A rejection of the version under test rolls back (traffic to stable, aliases as they
    were); an approval of it moves on to the cutover."""

    def reject(status: m.RolloutStatus, now: datetime) -> m.Signals | None:
        if status.phase is m.Phase.AWAITING_APPROVAL:
            return m.Signals(
                approval=m.ApprovalResponse(approved=False, version=C, by="bob", comment="not today")
            )
        return None

    rejected = run(DEMO, Candidate(loss=0.015), reject)
    assert rejected.status.phase is m.Phase.ROLLED_BACK
    assert "v4 rejected by bob (not today)" in rejected.first(m.Action.ROLLBACK).reason
    assert rejected.world.aliases == ALIASES and rejected.world.routes[-1].mode == "single"
    approved = run(DEMO, Candidate(loss=0.015))
    promote = approved.first(m.Action.PROMOTE)
    assert "v4 approved by alice" in promote.reason


def test_approval_for_another_version_is_refused_and_a_timeout_promotes_nothing() -> None:
    """While v4 is under test, an approval given for v5 is refused and the rollout keeps
    waiting (re-asking with the time left); with no valid answer before the plan's timeout
    the rollout ends TIMED_OUT with all traffic on stable and no alias moved."""

    def wrong_version(status: m.RolloutStatus, now: datetime) -> m.Signals | None:
        if status.phase is m.Phase.AWAITING_APPROVAL:
            return m.Signals(approval=m.ApprovalResponse(approved=True, version=5, by="mallory"))
        return None

    r = run(DEMO, Candidate(loss=0.015), wrong_version)
    assert r.status.phase is m.Phase.TIMED_OUT
    waits = [d for d in r.decisions if d.action is m.Action.AWAIT_APPROVAL]
    assert len(waits) > 10
    assert all(d.approval is not None and d.approval.candidate_version == C for d in waits)
    assert "approval refused: mallory answered for v5, this rollout tests v4" in waits[1].reason
    left = [d.approval.remaining_s(d.status.updated_at) for d in waits]
    assert left == sorted(left, reverse=True) and left[0] == 300
    end = r.decisions[-1]
    assert (
        end.action is m.Action.ABORT and "timed out: no answer within 300 s; nothing promoted" in end.reason
    )
    assert r.world.aliases == ALIASES and r.world.routes[-1].mode == "single"


def test_an_answer_after_the_deadline_does_not_count() -> None:
    """An approval that arrives after the deadline (a pause that timed out, then a late
    resume) ends the rollout TIMED_OUT: the deadline is in the persisted status."""
    r = run(DEMO, Candidate(loss=0.015), None, until=lambda st: st.phase is m.Phase.AWAITING_APPROVAL)
    assert r.status.phase is m.Phase.AWAITING_APPROVAL
    late = r.status.approval.deadline + timedelta(seconds=1)
    d = m.decide(
        r.status, None, DEMO, late, m.Signals(approval=m.ApprovalResponse(approved=True, version=C, by="al"))
    )
    assert d.status.phase is m.Phase.TIMED_OUT and "arrived after the deadline" in d.reason


def test_identical_models_never_get_a_declared_winner() -> None:
    """Given candidate and stable with the same loss, the A/B test never declares a winner:
    after its time and inconclusive limit the rollout aborts with 'no winner' and nothing is
    promoted. Over 20 seeded rollouts (a look at every tick) at most one (alpha) ends any
    other way; test_rollout_abtest measures the rate over hundreds."""
    plan = p.RolloutPlan(name="ab-only", tick_interval_s=5, steps=(DEMO_SUPERIORITY.steps[3], DEMO.steps[5]))
    ends = []
    for seed in range(20):
        r = run(plan, Candidate(seed=seed))
        ends.append(r.status.phase)
        if r.status.phase is m.Phase.ABORTED:
            assert "no winner" in r.decisions[-1].reason and r.world.aliases == ALIASES
    assert ends.count(m.Phase.ABORTED) >= 19, ends


def test_killed_orchestrator_resumes_mid_canary_without_repeating_a_change() -> None:
    """Given the orchestrator is killed at each point of the apply protocol during the
    canary (after persisting a decision, after applying an effect, after recording it),
    when a new process loads the persisted JSON status and carries on, then the rollout ends
    exactly as an uninterrupted one, and the serving layer (the real admin API's fake, which
    honours idempotency keys) saw every traffic change exactly once."""
    from serving.client import FakeServingAdmin

    reference = run(DEMO, Candidate(loss=0.015))
    for crash_point in ("after_persist", "after_apply", "after_record"):
        admin = FakeServingAdmin([S, C], {"stable_version": S})
        registry = World()
        disk: dict[str, str] = {}
        plan, feed = DEMO, Candidate(loss=0.015)
        status = m.start(
            "r-7", plan, model_name="fraud", stable_version=S, candidate_version=C, aliases=ALIASES, now=T0
        )
        disk["status"] = m.dump_status(status)
        now, crashed = T0, False

        def apply(effect: m.Effect, admin: FakeServingAdmin = admin, registry: World = registry) -> None:
            if effect.route is not None:
                admin.apply(effect.route.model_dump(), key=effect.key)
            registry.apply(replace_route(effect))

        for _ in range(600):
            status = m.load_status(disk["status"])  # every tick starts from what is on disk
            for effect in status.outstanding:  # a new process finishes what the dead one began
                apply(effect)
                status = m.mark_applied(status, effect.key, now)
                disk["status"] = m.dump_status(status)
            if status.terminal:
                break
            now += timedelta(seconds=plan.tick_interval_s)
            d = m.decide(status, feed(plan, status, now), plan, now, approve(status, now))
            disk["status"] = m.dump_status(d.status)
            mid_canary = d.status.route.mode == "canary" and d.status.route.weight_pct == 5 and d.effects
            if mid_canary and not crashed and crash_point == "after_persist":
                crashed = True
                continue  # killed before applying anything
            status = d.status
            for effect in d.effects:
                apply(effect)
                if mid_canary and not crashed and crash_point == "after_apply":
                    crashed = True
                    break  # killed between applying and recording
                status = m.mark_applied(status, effect.key, now)
                disk["status"] = m.dump_status(status)
            else:
                if mid_canary and not crashed and crash_point == "after_record":
                    crashed = True
                    continue
        final = m.load_status(disk["status"])
        assert crashed, crash_point
        assert final.phase is m.Phase.SUCCEEDED, (crash_point, final.history[-1].reason)
        assert [h.action for h in final.history] == [h.action for h in reference.status.history], crash_point
        changes = [(a["mode"], a["weight_pct"], a["active_slot"], a["stable_version"]) for a in admin.applied]
        assert len(changes) == len(set(changes)) == len(reference.world.routes), crash_point
        assert registry.aliases == reference.world.aliases


def replace_route(effect: m.Effect) -> m.Effect:
    """The registry side of an effect (the World ignores routes it did not see)."""
    return effect.model_copy(update={"route": None})


# --------------------------------------------------------------------------- no data is not a pass


def test_canary_with_no_candidate_traffic_is_never_promoted() -> None:
    """Given a canary whose candidate receives no requests, then the weight never advances:
    its checks stay INCONCLUSIVE, are counted once the step's duration has passed, and when
    they exceed their limit the rollout aborts, with all traffic on stable."""
    r = run(DEMO, Candidate(starved=("canary",)))
    assert r.status.phase is m.Phase.ABORTED
    end = r.decisions[-1]
    assert end.status.history[-1].step == "canary 1%"
    assert (
        "candidate_traffic: candidate answered 0 requests < min_samples 40 (inconclusive 25 > limit 24)"
        in end.reason
    )
    holds = [d for d in r.decisions if d.status.history[-1].step == "canary 1%" and d.action is m.Action.HOLD]
    assert len(holds) == 3 + 24  # the 20 s duration, then 24 counted ticks
    assert r.world.routes[-1].mode == "single" and r.world.aliases == ALIASES


def test_missing_observations_hold_and_never_pass() -> None:
    """A tick whose metrics could not be read (``None``) is no data: every check is
    INCONCLUSIVE and the step does not complete, however long it has run."""
    status = run(DEMO, Candidate(), ticks=3).status
    assert status.step_index == 1 and status.window_start is not None
    later = status.window_start + timedelta(seconds=29)
    d = m.decide(status, None, DEMO, later)
    assert d.action is m.Action.HOLD and d.status.step_index == 1
    assert all(x.outcome is Outcome.INCONCLUSIVE for x in d.measurements)


def test_dry_run_check_is_reported_but_never_fails_the_step() -> None:
    """A failing dry-run check is counted and named in the reason ('would rollback') while
    the step completes on its other checks."""
    plan = p.RolloutPlan(
        name="dry",
        tick_interval_s=5,
        steps=(
            p.ShadowStep(
                mirror_pct=50,
                duration_s=10,
                min_samples=10,
                checks=(
                    p.MetricCheck(
                        metric="latency_p99_ms",
                        relative_to_stable="ratio",
                        max=1.2,
                        min_samples=10,
                        dry_run=True,
                    ),
                    p.MetricCheck(metric="error_rate", max=0.01, min_samples=10),
                ),
            ),
            DEMO.steps[-1],
        ),
    )
    r = run(plan, Candidate(p99_factor=2.0, loss=0.03), ticks=5)
    advanced = [d for d in r.decisions if d.action is m.Action.PROMOTE]
    assert advanced, [d.reason for d in r.decisions]
    notes = [d.reason for d in r.decisions if "dry-run, not acted on" in d.reason]
    assert notes and "would rollback: latency_p99_ms_vs_stable_ratio" in notes[0]
    promoted = next(h for h in r.status.history if h.action is m.Action.PROMOTE)
    assert promoted.checks[0].dry_run and promoted.checks[0].outcome is Outcome.FAIL


def test_an_auc_over_a_handful_of_frauds_is_inconclusive_not_a_verdict() -> None:
    """With ``min_positives`` an AUC check waits for enough positive and negative labels on
    both sides: 500 labelled answers holding 5 frauds give INCONCLUSIVE (naming the
    counts), not a FAIL on noise; with enough of both it concludes on the numbers. The
    option is refused on a metric that has no labels."""
    from mlops.rollout.gate import evaluate_check

    check = p.MetricCheck(
        metric="auc", relative_to_stable="diff", min=-0.03, min_samples=300, min_positives=25
    )
    few = Observations(
        stable=VariantStats(requests=500, labelled=500, positives=6, auc=0.88),
        candidate=VariantStats(requests=500, labelled=500, positives=5, auc=0.77),
    )
    verdict = evaluate_check(check, few)
    assert verdict.result.outcome is Outcome.INCONCLUSIVE
    assert "5 positive / 495 negative candidate labels < min_positives 25" in verdict.result.reason
    enough = replace(
        few,
        stable=replace(few.stable, labelled=3000, positives=40),
        candidate=replace(few.candidate, labelled=3000, positives=38),
    )
    assert evaluate_check(check, enough).result.outcome is Outcome.FAIL
    stable_short = replace(enough, stable=replace(enough.stable, positives=10))
    assert "stable labels < min_positives" in evaluate_check(check, stable_short).result.reason
    with pytest.raises(ValueError, match="label-based metrics only"):
        p.MetricCheck(metric="latency_p99_ms", max=50, min_positives=5)


# --------------------------------------------------------------------------- limits, pause, errors


def _one_step_plan(*checks: p.MetricCheck, duration: float = 30) -> p.RolloutPlan:
    return p.RolloutPlan(
        name="one",
        tick_interval_s=5,
        steps=(
            p.CanaryStep(weights=(50,), duration_s=duration, min_samples=10, checks=checks),
            p.BlueGreenStep(min_samples=10),
        ),
    )


def test_failures_are_counted_against_the_failure_limit() -> None:
    """With failure_limit 2 a failing check holds twice and rolls back at the third
    failure, saying '(failures 3 > limit 2)'."""
    plan = _one_step_plan(
        p.MetricCheck(
            metric="latency_p99_ms", relative_to_stable="ratio", max=1.5, failure_limit=2, min_samples=10
        )
    )
    r = run(plan, Candidate(p99_factor=2.0))
    fails = [d for d in r.decisions if any(x.outcome is Outcome.FAIL for x in d.measurements)]
    assert [d.action for d in fails] == [m.Action.HOLD, m.Action.HOLD, m.Action.ROLLBACK]
    assert "2.00x > max 1.50x (n=" in fails[-1].reason and "(failures 3 > limit 2)" in fails[-1].reason


def test_on_fail_pause_keeps_traffic_and_waits_for_an_operator() -> None:
    """A check with on_fail: pause stops the rollout where it is (no traffic change); it
    holds until an operator resumes it (the step's analysis restarts) or rolls it back."""
    plan = _one_step_plan(
        p.MetricCheck(
            metric="decision_rate",
            relative_to_stable="ratio",
            min=0.8,
            max=1.25,
            min_samples=10,
            on_fail="pause",
        )
    )
    feed = Candidate()
    paused = run(
        plan,
        lambda p, st, now: _with_decision_rate(feed(p, st, now), 0.05),
        until=lambda st: st.phase is m.Phase.PAUSED,
    )
    assert paused.status.phase is m.Phase.PAUSED and paused.decisions[-1].action is m.Action.PAUSE
    assert paused.decisions[-1].effects == () and paused.status.route.mode == "canary"
    st = paused.status
    now = st.updated_at + timedelta(seconds=5)
    assert m.decide(st, None, plan, now).action is m.Action.HOLD
    resumed = m.decide(st, None, plan, now, m.Signals(command="resume", by="carol"))
    assert resumed.status.phase is m.Phase.RUNNING and resumed.status.counters == {}
    assert resumed.status.window_start == now and "resumed by carol" in resumed.reason
    back = m.decide(st, None, plan, now, m.Signals(command="rollback", by="carol", comment="bad rates"))
    assert back.action is m.Action.ROLLBACK and back.status.phase is m.Phase.ROLLED_BACK
    assert back.route is not None and back.route.mode.value == "single"
    assert "rollback requested by carol (bad rates)" in back.reason


def _with_decision_rate(obs: Observations | None, rate: float) -> Observations | None:
    if obs is None or obs.source != "log":
        return obs
    return replace(obs, candidate=replace(obs.candidate, decision_rate=rate))


def test_a_check_that_cannot_be_measured_aborts_after_its_error_limit() -> None:
    """A metric that cannot be computed (here: input drift without a reference) is ERROR,
    not PASS; after error_limit + 1 ticks the rollout aborts without a verdict."""
    plan = _one_step_plan(p.MetricCheck(metric="input_ks", max=0.2, min_samples=10, error_limit=2))
    r = run(plan, Candidate())  # its observations carry no input KS
    assert r.status.phase is m.Phase.ABORTED
    assert (
        "input_ks: not measured" in r.decisions[-1].reason
        and "(errors 3 > limit 2)" in r.decisions[-1].reason
    )


# --------------------------------------------------------------------------- versions and evidence


def test_new_challenger_mid_rollout_is_ignored_and_noted_once() -> None:
    """When the challenger alias moves to v9 during the rollout, the rollout stays pinned to
    v4: the decision log says so once, and the rollout carries on."""

    def signals(status: m.RolloutStatus, now: datetime) -> m.Signals | None:
        s = approve(status, now)
        return replace(s or m.Signals(), challenger_version=9) if status.phase is not m.Phase.PENDING else s

    r = run(DEMO, Candidate(loss=0.015), signals)
    assert r.status.phase is m.Phase.SUCCEEDED and r.status.candidate_version == C
    notes = [h.reason for h in r.status.history if "challenger alias moved to v9" in h.reason]
    assert len(notes) == 1 and "stays pinned to v4" in notes[0]


def test_observations_of_another_version_or_an_earlier_window_are_refused() -> None:
    """Evidence about another candidate version, or from before the current step's traffic
    change, never counts for this step: ``decide`` refuses it loudly."""
    status = run(DEMO, Candidate(), ticks=3).status
    now = status.window_start + timedelta(seconds=10)
    obs = Candidate()(DEMO, status, now)
    with pytest.raises(ObservationMismatch, match="candidate v9"):
        m.decide(status, replace(obs, candidate=replace(obs.candidate, version=9)), DEMO, now)
    with pytest.raises(ObservationMismatch, match="before this step's traffic change"):
        m.decide(status, replace(obs, since=status.window_start - timedelta(seconds=1)), DEMO, now)
    with pytest.raises(ObservationMismatch, match="needs prediction-log observations"):
        m.decide(status, replace(obs, source="replay"), DEMO, now)
    foreign = replace(obs, candidate=VariantStats(version=C), foreign=(("candidate", 9, 500),))
    d = m.decide(status, foreign, DEMO, now)
    assert d.action is m.Action.ABORT and "answers with another version" in d.reason


# --------------------------------------------------------------------------- after the promotion


def test_failing_post_promotion_analysis_flips_back_to_the_previous_champion() -> None:
    """Given a candidate whose errors start after the cutover, then the post-promotion
    analysis flips traffic back to the warm old slot and moves the champion back by
    compare-and-set in the same tick (the registry parks the rolled-back version as
    previous-champion)."""
    feed = Candidate(loss=0.015)

    def errors_after_cutover(
        plan: p.RolloutPlan, status: m.RolloutStatus, now: datetime
    ) -> Observations | None:
        obs = feed(plan, status, now)
        if obs is not None and status.phase is m.Phase.PROMOTED:
            return replace(obs, candidate=replace(obs.candidate, errors=obs.candidate.requests // 10))
        return obs

    r = run(DEMO, errors_after_cutover)
    assert r.status.phase is m.Phase.ROLLED_BACK
    back = r.first(m.Action.ROLLBACK)
    assert (
        "error_rate: candidate 0.1 > max 0.01" in back.reason
        and "aliases restored: champion v3" in back.reason
    )
    assert [e.kind for e in back.effects] == ["aliases", "route"]
    applied = [c for c in back.effects[0].aliases if not c.implied]
    assert [(c.alias, c.from_version, c.to_version) for c in applied] == [(CHAMPION, C, S)]
    assert _modes(r.world)[-2:] == ["blue_green candidate", "blue_green stable"]
    assert r.world.aliases == {**ALIASES, PREVIOUS_CHAMPION: C}


def test_manual_rollback_after_success_restores_the_previous_champion_at_once() -> None:
    """`mlops rollback` after a finished promotion: serving and aliases go back to the
    previous champion in one decision, without any analysis."""
    done = run(DEMO, Candidate(loss=0.015))
    assert done.status.phase is m.Phase.SUCCEEDED
    now = done.status.updated_at + timedelta(hours=1)
    d = m.decide(done.status, None, DEMO, now, m.Signals(command="rollback", by="oncall"))
    assert d.action is m.Action.ROLLBACK and d.measurements == ()
    for effect in d.effects:
        done.world.apply(effect)
    assert done.world.aliases == {**ALIASES, PREVIOUS_CHAMPION: C}
    assert (d.route.mode.value, d.status.route.stable_version) == ("single", S)
    assert m.decide(d.status, None, DEMO, now).action is m.Action.HOLD  # terminal: nothing more


# --------------------------------------------------------------------------- contract of the status


def test_status_round_trips_through_json_and_refuses_unknown_versions() -> None:
    """The persisted JSON reloads to an equal status; a schema version this code does not
    know, or a malformed file, is a StatusFormatError."""
    status = run(DEMO, Candidate(loss=0.015), ticks=40).status
    text = m.dump_status(status)
    assert m.load_status(text) == status
    with pytest.raises(StatusFormatError, match="schema_version"):
        m.load_status(text.replace('"schema_version": 1', '"schema_version": 2'))
    with pytest.raises(StatusFormatError):
        m.load_status("{not json")


def test_decide_refuses_another_plan_and_waits_for_outstanding_effects() -> None:
    """A status only continues under the plan it started with; while a decision's effects
    are outstanding, ``decide`` re-issues them and decides nothing new."""
    status = m.start(
        "r-8", DEMO, model_name="fraud", stable_version=S, candidate_version=C, aliases=ALIASES, now=T0
    )
    other = DEMO.model_copy(update={"tick_interval_s": 6.0})
    with pytest.raises(PlanMismatch):
        m.decide(status, None, other, T0)
    first = m.decide(status, None, DEMO, T0 + timedelta(seconds=5))  # enters replay (no effect)
    shadow = m.decide(first.status, Candidate()(DEMO, first.status, T0), DEMO, T0 + timedelta(seconds=10))
    assert shadow.effects and shadow.status.window_start is None
    again = m.decide(shadow.status, None, DEMO, T0 + timedelta(seconds=15))
    assert again.action is m.Action.HOLD and again.effects == shadow.effects and again.status == shadow.status
    with pytest.raises(RolloutError, match="no pending effect"):
        m.mark_applied(shadow.status, "nope", T0)


def test_start_checks_the_versions() -> None:
    """A rollout starts only for a candidate other than stable, and stable must be the
    champion the cutover will move by compare-and-set."""
    with pytest.raises(RolloutError, match="already the stable"):
        m.start("r", DEMO, model_name="f", stable_version=S, candidate_version=S, aliases=ALIASES, now=T0)
    with pytest.raises(RolloutError, match="not the champion"):
        m.start("r", DEMO, model_name="f", stable_version=2, candidate_version=C, aliases=ALIASES, now=T0)


def test_ab_step_checks_the_sample_ratio() -> None:
    """An A/B split whose entity counts are far from 50/50 aborts the experiment (SRM)."""
    ab = DEMO_SUPERIORITY.steps[3]
    assert isinstance(ab, p.ABStep)
    feed = Candidate(loss=0.015)

    def skewed(plan: p.RolloutPlan, status: m.RolloutStatus, now: datetime) -> Observations | None:
        obs = feed(plan, status, now)
        if obs is not None and obs.ab is not None:
            return replace(obs, ab=replace(obs.ab, entities_candidate=int(obs.ab.entities_stable * 0.8)))
        return obs

    r = run(DEMO_SUPERIORITY, skewed)
    assert r.status.phase is m.Phase.ABORTED
    assert "the split is not what was configured" in r.decisions[-1].reason
