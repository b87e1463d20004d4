"""The server rollout as a pure state machine: ``decide(status, observations, plan, now,
signals) -> Decision``.

No IO, no clock, no unseeded randomness (the bandit step draws from a generator seeded by
the rollout id, the step and the tick, so a resumed rollout decides the same). A decision carries the next status (persist it first) and
its effects: absolute, keyed route tables and alias compare-and-set moves, recorded in the
status's ledger by ``mark_applied`` so a resumed orchestrator never repeats one. Phases,
actions and counting are the shared rollout vocabulary (``mlops.rollout.vocabulary``). The
tick loop, the phase diagram and the crash semantics: docs/design/rollout-model.md.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import Field, ValidationError

from mlops.edge import ota
from mlops.gates import GateResult, Outcome
from mlops.registry_model import CHAMPION, PREVIOUS_CHAMPION, plan_promotion
from mlops.rollout.bandit import ArmStats, BanditPolicy, assess
from mlops.rollout.errors import ObservationMismatch, PlanMismatch, RolloutError, StatusFormatError
from mlops.rollout.gate import TRAFFIC_CHECK, Measurement, fmt, measure_step
from mlops.rollout.observe import CANDIDATE, STABLE, Observations
from mlops.rollout.plan import (
    ABStep,
    ApprovalStep,
    BanditStep,
    BlueGreenStep,
    CanaryStep,
    DeviceStep,
    ReplayStep,
    RolloutPlan,
    ShadowStep,
    step_label,
)
from mlops.rollout.vocabulary import SEVERITY, TERMINAL, Action, Counters, Phase, tally
from mlops.rollout.vocabulary import Decision as _Decision
from mlops.routing import RouteTable
from mlops.settings import EdgeConfig, StrictModel

SCHEMA_VERSION = 1

_M = TypeVar("_M", bound=StrictModel)


# --------------------------------------------------------------------------- effects


class RouteSpec(StrictModel):
    """The serving state a route effect sets: a ``RouteTable`` plus the version each slot
    serves (``candidate_version=None``: the candidate slot is unloaded)."""

    mode: Literal["single", "shadow", "canary", "ab", "blue_green"] = "single"
    weight_pct: float = 0.0
    mirror_pct: float = 0.0
    salt: str = ""
    active_slot: Literal["stable", "candidate"] = "stable"
    stable_version: int
    candidate_version: int | None = None

    def table(self) -> RouteTable:
        """The router's route table for this spec."""
        return RouteTable.of(self)

    @property
    def candidate_pct(self) -> float:
        """Share of live answers given by the candidate slot, in percent."""
        if self.mode in ("canary", "ab"):
            return self.weight_pct
        if self.mode == "blue_green":
            return 100.0 if self.active_slot == CANDIDATE else 0.0
        return 0.0

    def describe(self) -> str:
        """The routes in words, for reasons and logs."""
        slots = f"stable=v{self.stable_version}, candidate=" + (
            f"v{self.candidate_version}" if self.candidate_version else "-"
        )
        if self.mode in ("canary", "ab"):
            return f"{self.mode} {self.weight_pct:g}% candidate ({slots})"
        if self.mode == "shadow":
            return f"shadow {self.mirror_pct:g}% mirrored ({slots})"
        if self.mode == "blue_green":
            return f"blue_green active={self.active_slot} ({slots})"
        return f"single: all traffic to stable ({slots})"


class AliasChange(StrictModel):
    """One compare-and-set alias move: ``alias`` from ``from_version`` to ``to_version``.

    Apply a change as ``ModelRegistry.move_alias(model, alias, to_version,
    expect_current=from_version)``; an alias already at ``to_version`` (a repeat after a
    crash) is done. ``implied`` changes are made by the registry itself when ``champion``
    moves (the outgoing champion becomes ``previous-champion``): they are listed for the
    record and for fakes, and are not applied on their own.
    """

    alias: str
    from_version: int | None
    to_version: int | None
    implied: bool = False


class EdgeAction(StrictModel):
    """A change to the edge fleet or its release repository.

    ``release``: compress ``source_version`` for the devices step's budget and publish it as
    the next signed release (a repeat after a crash finds that release already published).
    ``serve_cohort``: serve release ``version`` to a ``percent`` cohort and let the devices
    poll. ``mark_good``: record ``version`` as the last good release. ``restore``: publish a
    release carrying ``version``'s model and serve it to every device. ``halt``: serve
    nothing more (no earlier good release to restore): the record of a halted fleet.
    """

    action: Literal["release", "serve_cohort", "mark_good", "restore", "halt"]
    version: int | None = None
    percent: float = 100.0
    source_version: int | None = None


class Effect(StrictModel):
    """One change to the outside world, with the idempotency key it is recorded under.

    A route effect normally starts a new analysis window once applied; a bandit step's
    re-allocation (``restarts_window=False``) keeps the step's window, whose evidence
    accumulates across re-allocations."""

    key: str
    kind: Literal["route", "aliases", "edge"]
    description: str
    route: RouteSpec | None = None
    aliases: tuple[AliasChange, ...] = ()
    edge: EdgeAction | None = None
    restarts_window: bool = True


class Applied(StrictModel):
    """An entry of the applied-effects ledger."""

    key: str
    at: datetime


# --------------------------------------------------------------------------- history


class CheckRecord(StrictModel):
    """A measurement as the decision log keeps it (NaN is stored as ``None``)."""

    key: str
    metric: str
    outcome: Outcome
    reason: str
    value: float | None = None
    candidate: float | None = None
    stable: float | None = None
    min: float | None = None
    max: float | None = None
    samples: int = 0
    dry_run: bool = False
    failures: int = 0
    inconclusives: int = 0
    errors: int = 0


class VariantSnapshot(StrictModel):
    """The system numbers of one variant at one tick, for the report."""

    requests: int = 0
    errors: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    auc: float | None = None
    labelled: int = 0


class ABSnapshot(StrictModel):
    """The A/B primary test at one tick (improvement > 0: candidate better)."""

    metric: str
    outcome: Outcome
    improvement: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    n_stable: int = 0
    n_candidate: int = 0
    n_required: int | None = None


class BanditState(StrictModel):
    """A bandit step's reading so far: ticks assessed, the arm leading the stopping rule and
    on how many consecutive ticks, the candidate's weight, and the last tick's numbers per
    arm (stable, candidate)."""

    ticks: int = 0
    leader: int | None = None
    streak: int = 0
    weight_pct: float = 0.0
    n: tuple[int, ...] = ()
    means: tuple[float | None, ...] = ()
    prob_best: tuple[float, ...] = ()
    expected_loss: tuple[float, ...] = ()


class DeviceState(StrictModel):
    """The devices step: the published release, the last good release before it (what a
    device rollback restores) and the OTA machine's status (``mlops.edge.ota``, as data)."""

    release_version: int | None = None
    last_good: int | None = None
    ota: dict | None = None
    serves: int = 0  # cohort serves so far: keys each one

    def ota_status(self) -> ota.RolloutStatus | None:
        """The OTA machine's status, or ``None`` before the first cohort."""
        return None if self.ota is None else ota.RolloutStatus.from_dict(self.ota)


class Record(StrictModel):
    """One decision of the rollout's log."""

    seq: int
    at: datetime
    phase: Phase
    step_index: int
    step: str
    action: Action
    reason: str
    route: RouteSpec
    checks: tuple[CheckRecord, ...] = ()
    variants: dict[str, VariantSnapshot] = Field(default_factory=dict)
    ab: ABSnapshot | None = None
    bandit: BanditState | None = None
    effects: tuple[str, ...] = ()


# --------------------------------------------------------------------------- approval


class ApprovalRequest(StrictModel):
    """What a human is asked to approve, and until when."""

    rollout_id: str
    model_name: str
    candidate_version: int
    stable_version: int
    requested_at: datetime
    deadline: datetime
    evidence: str = ""

    def remaining_s(self, now: datetime) -> float:
        """Seconds left before the request times out (the pause timeout to use)."""
        return max(0.0, (self.deadline - now).total_seconds())


class ApprovalResponse(StrictModel):
    """A human's answer, for the version they were shown."""

    approved: bool
    version: int
    by: str = Field(min_length=1)
    comment: str = ""


@dataclass(frozen=True)
class Signals:
    """Inputs of a tick other than metrics.

    ``approval``: an answer to the pending approval. ``challenger_version``: where the
    registry's ``challenger`` alias points now. ``command``: an operator's ``resume`` (of a
    paused rollout), ``rollback`` or ``abort``; ``by`` and ``comment`` go into the log.
    """

    approval: ApprovalResponse | None = None
    challenger_version: int | None = None
    device_gate: GateResult | None = None
    command: Literal["resume", "rollback", "abort"] | None = None
    by: str = "operator"
    comment: str = ""


# --------------------------------------------------------------------------- status


class RolloutStatus(StrictModel):
    """Everything a rollout needs to resume after its orchestrator dies.

    Persisted as JSON (``dump_status``/``load_status``) after every decision and every
    applied effect. ``aliases_before`` are the registry aliases when the rollout started,
    which a rollback after promotion restores. ``route`` is the serving state the last
    decision set (or is setting). ``pending`` are the last decision's effects and
    ``applied`` the ledger of every effect key applied so far.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    rollout_id: str = Field(min_length=1, max_length=120)  # effect keys stay within 200 characters
    model_name: str
    plan_name: str
    plan_digest: str
    stable_version: int
    candidate_version: int
    aliases_before: dict[str, int] = Field(default_factory=dict)
    created_at: datetime
    updated_at: datetime
    phase: Phase = Phase.PENDING
    paused_phase: Phase | None = None
    step_index: int = 0
    weight_index: int = 0
    step_started_at: datetime | None = None
    route: RouteSpec
    counters: dict[str, Counters] = Field(default_factory=dict)
    approval: ApprovalRequest | None = None
    promoted_at: datetime | None = None
    pending: tuple[Effect, ...] = ()
    applied: tuple[Applied, ...] = ()
    history: tuple[Record, ...] = ()
    seq: int = 0
    noted_versions: tuple[int, ...] = ()
    final_reason: str | None = None
    bandit: BanditState | None = None
    device: DeviceState | None = None

    @property
    def terminal(self) -> bool:
        """Whether the rollout has ended."""
        return self.phase in TERMINAL

    @property
    def applied_keys(self) -> frozenset[str]:
        """Keys of every effect applied so far."""
        return frozenset(a.key for a in self.applied)

    @property
    def outstanding(self) -> tuple[Effect, ...]:
        """Effects of the last decision not yet recorded as applied."""
        done = self.applied_keys
        return tuple(e for e in self.pending if e.key not in done)

    @property
    def window_start(self) -> datetime | None:
        """Observations for the next tick start here: when the current step's traffic
        change was applied (``None`` while it is still outstanding)."""
        return self.step_started_at


def start(
    rollout_id: str,
    plan: RolloutPlan,
    *,
    model_name: str,
    stable_version: int,
    candidate_version: int,
    aliases: Mapping[str, int],
    now: datetime,
) -> RolloutStatus:
    """A new rollout of ``candidate_version`` against ``stable_version`` (the champion).

    ``aliases`` are the model's aliases as read from the registry now; the champion must be
    the stable version, since the cutover moves it by compare-and-set.
    """
    if candidate_version == stable_version:
        raise RolloutError(f"candidate v{candidate_version} is already the stable version")
    if aliases.get(CHAMPION) != stable_version:
        raise RolloutError(
            f"stable v{stable_version} is not the champion (champion is {aliases.get(CHAMPION)})"
        )
    return RolloutStatus(
        rollout_id=rollout_id,
        model_name=model_name,
        plan_name=plan.name,
        plan_digest=plan.digest,
        stable_version=stable_version,
        candidate_version=candidate_version,
        aliases_before=dict(aliases),
        created_at=now,
        updated_at=now,
        route=RouteSpec(stable_version=stable_version, candidate_version=candidate_version),
    )


def mark_applied(status: RolloutStatus, key: str, at: datetime) -> RolloutStatus:
    """The status after effect ``key`` was applied at ``at``.

    When the last outstanding route effect of the current step lands, the step's analysis
    window starts (``step_started_at = at``): evidence is only ever read from traffic that
    went through the new routes.
    """
    effect = next((e for e in status.pending if e.key == key), None)
    if effect is None:
        raise RolloutError(f"no pending effect {key!r} in rollout {status.rollout_id}")
    if key in status.applied_keys:
        return status
    update: dict[str, object] = {"applied": status.applied + (Applied(key=key, at=at),), "updated_at": at}
    remaining = [e for e in status.outstanding if e.key != key and e.kind == "route" and e.restarts_window]
    if effect.kind == "route" and effect.restarts_window and not remaining and not status.terminal:
        update["step_started_at"] = at
        if status.phase is Phase.PROMOTED:
            update["promoted_at"] = at
    return status.model_copy(update=update)


def dump_status(status: RolloutStatus) -> str:
    """The status as JSON text (what ``rollouts/<id>/status.json`` holds)."""
    return status.model_dump_json(indent=1)


def load_status(text: str) -> RolloutStatus:
    """Parse a persisted status; an unknown schema version or a bad field raises
    ``StatusFormatError``."""
    try:
        return RolloutStatus.model_validate_json(text)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise StatusFormatError(f"rollout status: {where}: {err['msg']}") from None


# --------------------------------------------------------------------------- decision


@dataclass(frozen=True)
class Decision(_Decision["RolloutStatus", Effect]):
    """The outcome of one tick of a server rollout.

    ``status`` is the next status, to persist *before* applying ``effects`` (which it
    lists as pending). ``approval`` is set when a human must be asked (again).
    """

    measurements: tuple[Measurement, ...] = ()
    approval: ApprovalRequest | None = None

    @property
    def route(self) -> RouteTable | None:
        """The route table this decision sets, if it changes traffic."""
        for e in self.effects:
            if e.route is not None:
                return e.route.table()
        return None


def _none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _snapshot(model: type[_M], source: object, **given: Any) -> _M:
    """``model`` with ``given`` and each other field copied from ``source`` (a NaN as None)."""
    values = {}
    for name in model.model_fields:
        if name not in given:
            value = getattr(source, name)
            values[name] = _none(value) if isinstance(value, float) else value
    return model(**given, **values)


def _elapsed(status: RolloutStatus, now: datetime) -> float:
    return (now - status.step_started_at).total_seconds() if status.step_started_at else 0.0


class _Tick:
    """One call of ``decide``: the inputs, and the builders of its possible decisions."""

    def __init__(
        self,
        status: RolloutStatus,
        plan: RolloutPlan,
        now: datetime,
        obs: Observations | None,
        notes: list[str],
    ) -> None:
        self.status, self.plan, self.now, self.notes = status, plan, now, notes
        self.obs = obs
        self.measurements: tuple[Measurement, ...] = ()
        self.counters: dict[str, Counters] = {}  # after counting this tick's measurements
        self.bandit: BanditState | None = None  # this tick's bandit reading, for the log

    # ---- status helpers
    @property
    def rid(self) -> str:
        return self.status.rollout_id

    def label(self, index: int | None = None) -> str:
        i = self.status.step_index if index is None else index
        if i >= len(self.plan.steps):
            return "done"
        name = step_label(self.plan, i)
        step = self.plan.steps[i]
        if isinstance(step, CanaryStep):
            w = self.status.weight_index if index is None else 0
            return f"{name} {step.weights[w]:g}%"
        if isinstance(step, DeviceStep) and index is None and self.status.device is not None:
            st = self.status.device.ota_status()
            if st is not None:
                return f"{name} {st.percent:g}%"
        return name

    def route(self, mode: str = "single", **kw: object) -> RouteSpec:
        s = self.status
        base: dict[str, object] = dict(stable_version=s.stable_version, candidate_version=s.candidate_version)
        if mode in ("shadow", "canary", "ab"):
            base["salt"] = s.rollout_id
        return RouteSpec(mode=mode, **{**base, **kw})  # type: ignore[arg-type]

    def route_effect(self, name: str, spec: RouteSpec, why: str, restarts_window: bool = True) -> Effect:
        return Effect(
            key=f"{self.rid}/{name}/route",
            kind="route",
            route=spec,
            description=f"{why}: {spec.describe()}",
            restarts_window=restarts_window,
        )

    # ---- decision builder
    def decide(
        self,
        action: Action,
        reason: str,
        *,
        effects: tuple[Effect, ...] = (),
        ask: ApprovalRequest | None = None,
        **update: object,
    ) -> Decision:
        """A recorded decision: the next status (with ``effects`` pending) and its log entry."""
        s = self.status
        done = s.applied_keys
        effects = tuple(e for e in effects if e.key not in done)
        if self.notes:
            reason = f"{reason}; " + "; ".join(self.notes)
        if effects:
            update["pending"] = effects
            moves = next((e for e in effects if e.route is not None), None)
            if moves is not None:
                update["route"] = moves.route
                if moves.restarts_window:
                    update["step_started_at"] = None  # set by mark_applied when traffic has moved
        update["updated_at"] = self.now
        new = s.model_copy(update=update)
        new = new.model_copy(
            update={"seq": s.seq + 1, "history": s.history + (self.record(new, action, reason, effects),)}
        )
        return Decision(action, reason, new, effects, self.measurements, ask)

    def record(self, new: RolloutStatus, action: Action, reason: str, effects: tuple[Effect, ...]) -> Record:
        s = self.status
        checks = []
        ab = None
        for m in self.measurements:
            c = self.counters.get(m.key, Counters())
            checks.append(
                CheckRecord(
                    key=m.key,
                    metric=m.metric,
                    outcome=m.outcome,
                    reason=m.result.reason,
                    value=_none(m.result.value),
                    candidate=_none(m.candidate),
                    stable=_none(m.stable),
                    min=m.min,
                    max=m.max,
                    samples=m.samples,
                    dry_run=m.limits.dry_run,
                    failures=c.failures,
                    inconclusives=c.inconclusives,
                    errors=c.errors,
                )
            )
            if m.ab is not None:
                ab = _snapshot(ABSnapshot, m.ab, metric=m.metric)
        variants = {}
        if self.obs is not None and self.obs.source == "log":
            for name in (STABLE, CANDIDATE):
                variants[name] = _snapshot(VariantSnapshot, self.obs.variant(name))
        return Record(
            seq=s.seq + 1,
            at=self.now,
            phase=new.phase,
            step_index=s.step_index,
            step=self.label(),
            action=action,
            reason=reason,
            route=new.route,
            checks=tuple(checks),
            variants=variants,
            ab=ab,
            bandit=self.bandit,
            effects=tuple(e.key for e in effects),
        )

    # ---- entering steps
    def enter(self, index: int, weight: int, why: str) -> Decision:
        """Apply step ``index`` (canary weight ``weight``): the decision that starts it."""
        plan, s = self.plan, self.status
        self.status = s = s.model_copy(update={"step_index": index, "weight_index": weight, "counters": {}})
        step = plan.steps[index]
        label = self.label()
        common: dict[str, object] = dict(
            phase=Phase.RUNNING,
            step_index=index,
            weight_index=weight,
            counters={},
            step_started_at=self.now,
            paused_phase=None,
        )
        if isinstance(step, ReplayStep):
            return self.decide(
                Action.ADVANCE, f"{why}; {label}: waiting for the offline comparison", **common
            )
        if isinstance(step, ShadowStep | CanaryStep | ABStep | BanditStep):
            if isinstance(step, ShadowStep):
                spec = self.route("shadow", mirror_pct=step.mirror_pct)
            elif isinstance(step, CanaryStep):
                spec = self.route("canary", weight_pct=step.weights[weight])
            elif isinstance(step, BanditStep):
                spec = self.route("canary", weight_pct=step.initial_pct)
                common["bandit"] = BanditState(weight_pct=step.initial_pct)
            else:
                spec = self.route("ab", weight_pct=step.candidate_pct)
            key = f"step{index}" + (f".{weight}" if isinstance(step, CanaryStep) else "")
            effect = self.route_effect(key, spec, f"enter {label}")
            return self.decide(
                Action.ADVANCE, f"{why}; entering {label}: {spec.describe()}", effects=(effect,), **common
            )
        if isinstance(step, ApprovalStep):
            req = ApprovalRequest(
                rollout_id=s.rollout_id,
                model_name=s.model_name,
                candidate_version=s.candidate_version,
                stable_version=s.stable_version,
                requested_at=self.now,
                deadline=self.now + timedelta(seconds=step.timeout_s),
                evidence=self.evidence(),
            )
            common["phase"] = Phase.AWAITING_APPROVAL
            reason = (
                f"{why}; {label}: approval of v{s.candidate_version} requested, timeout {step.timeout_s:g} s"
            )
            return self.decide(Action.AWAIT_APPROVAL, reason, ask=req, approval=req, **common)
        if isinstance(step, DeviceStep):
            common["phase"] = Phase.PROMOTED
            release = Effect(
                key=f"{self.rid}/edge/release",
                kind="edge",
                edge=EdgeAction(action="release", source_version=s.candidate_version),
                description=(
                    f"compress v{s.candidate_version} for {step.budget} and publish it as the next signed release"
                ),
            )
            reason = (
                f"{why}; {label}: v{s.candidate_version} goes on to the {step.fleet} fleet ({step.budget})"
            )
            return self.decide(Action.ADVANCE, reason, effects=(release,), device=DeviceState(), **common)
        assert isinstance(step, BlueGreenStep)
        aliases = _champion_effect(f"{self.rid}/promote/aliases", dict(s.aliases_before), s.candidate_version)
        flip = self.route_effect("promote", self.route("blue_green", active_slot=CANDIDATE), "cut over")
        common["phase"] = Phase.PROMOTED
        reason = (
            f"{why}; promoting v{s.candidate_version}: champion alias moves and all traffic flips to the "
            f"candidate slot, v{s.stable_version} stays warm for {step.keep_warm_s:g} s"
        )
        return self.decide(Action.PROMOTE, reason, effects=(aliases, flip), promoted_at=self.now, **common)

    def edge_effect(self, name: str, action: EdgeAction) -> Effect:
        """A keyed fleet effect."""
        if action.action == "serve_cohort":
            text = f"serve release v{action.version} to {action.percent:g}% of the fleet"
        elif action.action == "mark_good":
            text = f"record release v{action.version} as the last good one"
        elif action.action == "restore":
            text = f"publish a release restoring release v{action.version}'s model on every device"
        else:
            text = "fleet halted: no earlier good release to restore, devices stay where they are"
        return Effect(key=f"{self.rid}/edge/{name}", kind="edge", edge=action, description=text)

    def fleet_stop(self, last_good: int | None) -> Effect:
        """The effect that halts the fleet: restore the last good release, or stop serving."""
        if last_good is None:
            return self.edge_effect("halt", EdgeAction(action="halt"))
        return self.edge_effect("restore", EdgeAction(action="restore", version=last_good))

    def evidence(self) -> str:
        last = [r for r in self.status.history if r.action in (Action.ADVANCE, Action.PROMOTE)][-3:]
        return " | ".join(f"{r.step}: {r.reason}" for r in last)

    def advance(self, why: str, extra: tuple[Effect, ...] = (), phase: Phase = Phase.SUCCEEDED) -> Decision:
        """Move past the current step (or canary weight); past the last one, finish with
        ``extra`` effects first and the old slot released."""
        s, plan = self.status, self.plan
        step = plan.steps[s.step_index]
        if isinstance(step, CanaryStep) and s.weight_index + 1 < len(step.weights):
            return self.enter(s.step_index, s.weight_index + 1, why)
        if s.step_index + 1 < len(plan.steps):
            return self.enter(s.step_index + 1, 0, why)
        release = self.route_effect(
            "release",
            RouteSpec(stable_version=s.candidate_version, candidate_version=None),
            f"v{s.candidate_version} is champion, release v{s.stable_version}",
        )
        if phase is Phase.SUCCEEDED:
            reason = f"{why}; rollout succeeded: v{s.candidate_version} serves all traffic, v{s.stable_version} released"
            action = Action.ADVANCE
        else:
            reason = f"{why}; v{s.candidate_version} keeps serving all traffic, v{s.stable_version} released"
            action = Action.ABORT
        return self.decide(action, reason, effects=(*extra, release), phase=phase, final_reason=reason)

    # ---- stopping
    def stop(
        self, action: Action, reason: str, phase: Phase | None = None, extra: tuple[Effect, ...] = ()
    ) -> Decision:
        """Send all traffic back to stable (and aliases back, after a promotion) now; a fleet
        rollout under way is halted (``extra``: the fleet effects the caller decided)."""
        s = self.status
        phase = phase or (Phase.ROLLED_BACK if action is Action.ROLLBACK else Phase.ABORTED)
        done = s.applied_keys
        effects: list[Effect] = list(extra)
        st = s.device.ota_status() if s.device is not None else None
        if not extra and st is not None and not st.done:
            effects.append(self.fleet_stop(st.last_good))
            reason += "; " + effects[-1].description
        promoted = f"{self.rid}/promote/aliases" in done
        if promoted:
            after = {**s.aliases_before, CHAMPION: s.candidate_version, PREVIOUS_CHAMPION: s.stable_version}
            effects.append(_champion_effect(f"{self.rid}/revert/aliases", after, s.stable_version))
        if f"{self.rid}/promote/route" in done and f"{self.rid}/release/route" not in done:
            spec = self.route("blue_green", active_slot=STABLE)  # the old slot is still warm: flip back
        else:
            spec = self.route("single")
        effects.append(self.route_effect("revert", spec, "all traffic to stable"))
        cancelled = [e.key for e in s.outstanding]
        if cancelled:
            reason += f" (cancelled unapplied effects: {', '.join(cancelled)})"
        if promoted:
            reason += (
                f"; aliases restored: champion v{s.stable_version} (previous-champion v{s.candidate_version})"
            )
        else:
            reason += "; registry aliases untouched"
        effects = [e for e in effects if e.key not in done]
        return self.decide(
            action,
            reason,
            effects=tuple(effects),
            phase=phase,
            final_reason=reason,
            pending=tuple(effects),
            approval=None,
        )


def _champion_effect(key: str, current: dict[str, int], target: int) -> Effect:
    """The alias effect that makes ``target`` the champion (the registry's promotion rule:
    the outgoing champion becomes previous-champion)."""
    moves = plan_promotion(CHAMPION, target, current)
    text = ", ".join(f"{a} v{f} -> v{t}" for a, f, t in moves)
    return Effect(
        key=key,
        kind="aliases",
        description=text,
        aliases=tuple(
            AliasChange(alias=a, from_version=f, to_version=t, implied=a != CHAMPION) for a, f, t in moves
        ),
    )


def _validated(
    obs: Observations | None, status: RolloutStatus, replay: bool
) -> tuple[Observations, list[str]]:
    """The observations usable for this step, or an error when they are evidence about
    something else (other versions, traffic from before the step's change)."""
    notes: list[str] = []
    if obs is None:
        return Observations(source="replay" if replay else "log"), notes
    if replay != (obs.source == "replay"):
        want = (
            "the offline comparison (observe_replay)" if replay else "prediction-log observations (observe)"
        )
        raise ObservationMismatch(f"this step needs {want}, got {obs.source} observations")
    for name, pinned in ((STABLE, status.stable_version), (CANDIDATE, status.candidate_version)):
        v = obs.variant(name).version
        if v is not None and v != pinned:
            raise ObservationMismatch(f"observations are of {name} v{v}, this rollout pins v{pinned}")
    if obs.source == "log" and obs.since is not None and status.step_started_at is not None:
        if obs.since < status.step_started_at:
            raise ObservationMismatch(
                f"observations start at {obs.since.isoformat()}, before this step's traffic change at "
                f"{status.step_started_at.isoformat()}"
            )
    if obs.foreign:
        notes.append(
            "excluded rows of other versions: " + ", ".join(f"{v} v{ver} x{n}" for v, ver, n in obs.foreign)
        )
    return obs, notes


def _count(
    status: RolloutStatus, ms: tuple[Measurement, ...], due: bool
) -> tuple[dict[str, Counters], list[tuple[str, Measurement, str]]]:
    """New counters, and the checks that trip: ``(action, measurement, reason)``."""
    counters = dict(status.counters)
    trips: list[tuple[str, Measurement, str]] = []
    for m in ms:
        t = tally(counters.get(m.key, Counters()), m.outcome, m.limits, due=due)
        counters[m.key] = t.counters
        if t.trip is not None:
            trips.append((t.trip, m, f"{m.result.reason} ({t.note})"))
    return counters, trips


def decide(
    status: RolloutStatus,
    observations: Observations | None,
    plan: RolloutPlan,
    now: datetime,
    signals: Signals | None = None,
) -> Decision:
    """The next action of a rollout, its reason with the numbers, and the next status.

    ``observations`` are this tick's metrics over ``status.window_start`` .. ``now`` (for
    the replay step: the offline comparison); ``None`` means nothing could be read, which
    is treated as no data (INCONCLUSIVE), never as a pass.
    """
    if plan.digest != status.plan_digest or plan.name != status.plan_name:
        raise PlanMismatch(
            f"rollout {status.rollout_id} runs plan {status.plan_name} ({status.plan_digest}), "
            f"not {plan.name} ({plan.digest})"
        )
    sig = signals or Signals()
    who = f"{sig.by}" + (f" ({sig.comment})" if sig.comment else "")
    tick = _Tick(status, plan, now, None, [])

    if status.terminal:
        if sig.command == "rollback" and status.phase is Phase.SUCCEEDED:
            return tick.stop(
                Action.ROLLBACK,
                f"rollback requested by {who} after promotion: back to "
                f"v{status.stable_version}, skipping analysis",
            )
        return Decision(Action.HOLD, f"rollout is {status.phase.value}: {status.final_reason}", status)
    if sig.command in ("rollback", "abort"):
        action = Action.ROLLBACK if sig.command == "rollback" else Action.ABORT
        return tick.stop(action, f"{sig.command} requested by {who}")
    if status.outstanding:
        keys = ", ".join(e.key for e in status.outstanding)
        return Decision(Action.HOLD, f"waiting for effects to be applied: {keys}", status, status.outstanding)

    if (
        sig.challenger_version is not None
        and sig.challenger_version != status.candidate_version
        and sig.challenger_version not in status.noted_versions
    ):
        tick.notes.append(
            f"challenger alias moved to v{sig.challenger_version}: ignored, this rollout stays pinned to "
            f"v{status.candidate_version} (v{sig.challenger_version} needs its own rollout, with its own evidence)"
        )
        tick.status = status = status.model_copy(
            update={"noted_versions": status.noted_versions + (sig.challenger_version,)}
        )
    if sig.command == "resume" and status.phase is not Phase.PAUSED:
        tick.notes.append(f"resume from {who} ignored: the rollout is not paused")
    if sig.approval is not None and status.phase is not Phase.AWAITING_APPROVAL:
        tick.notes.append(
            f"approval from {sig.approval.by} for v{sig.approval.version} ignored: nothing awaits approval"
        )

    if status.phase is Phase.PENDING:
        return tick.enter(
            0, 0, f"rollout of v{status.candidate_version} against v{status.stable_version} started"
        )
    if status.phase is Phase.PAUSED:
        if sig.command == "resume":
            resumed = status.paused_phase or Phase.RUNNING
            return tick.decide(
                Action.HOLD,
                f"resumed by {who}: {tick.label()} analysis restarts",
                phase=resumed,
                paused_phase=None,
                counters={},
                step_started_at=now,
            )
        return tick.decide(
            Action.HOLD, f"paused at {tick.label()}: waiting for an operator to resume, roll back or abort"
        )

    step = plan.steps[status.step_index]
    obs, notes = _validated(observations, status, isinstance(step, ReplayStep))
    tick.obs = obs
    tick.notes.extend(notes)
    foreign_candidate = sum(n for v, _, n in obs.foreign if v == CANDIDATE)
    if foreign_candidate and obs.candidate.requests == 0:
        return tick.stop(
            Action.ABORT,
            f"the candidate slot answers with another version ({foreign_candidate} rows), "
            f"not v{status.candidate_version} under test",
        )

    elapsed = _elapsed(status, now)
    duration = step.duration_s
    if isinstance(step, BlueGreenStep):
        duration = max(step.duration_s, step.keep_warm_s)
    due = elapsed >= duration
    tick.measurements = ms = measure_step(step, obs)
    counters, trips = _count(status, ms, due)
    tick.counters = counters
    tick.status = status = status.model_copy(update={"counters": counters})

    live = [t for t in trips if not t[1].limits.dry_run]
    dry = [t for t in trips if t[1].limits.dry_run]
    if dry:
        tick.notes.append("dry-run, not acted on: " + "; ".join(f"would {a}: {r}" for a, _, r in dry))
    if live:
        action = max((a for a, _, _ in live), key=SEVERITY.__getitem__)
        reason = f"{tick.label()}: " + "; ".join(r for _, _, r in live)
        if action == "pause":
            return tick.decide(Action.PAUSE, reason, phase=Phase.PAUSED, paused_phase=status.phase)
        return tick.stop(Action.ROLLBACK if action == "rollback" else Action.ABORT, reason)

    if status.phase is Phase.AWAITING_APPROVAL:
        return _approval(tick, sig)
    if isinstance(step, BanditStep):
        return _bandit(tick, step, elapsed, due)
    if isinstance(step, DeviceStep):
        return _devices(tick, step, sig)

    counted = [m for m in ms if not m.limits.dry_run]
    waiting = [m for m in counted if m.outcome is not Outcome.PASS]
    if due and not waiting:
        summary = "; ".join(m.result.reason for m in counted if m.key != TRAFFIC_CHECK) or "no checks"
        return tick.advance(f"{tick.label()} passed after {elapsed:.0f} s: {summary}")
    parts = []
    if not due:
        parts.append(f"{elapsed:.0f} of {duration:g} s elapsed")
    for m in waiting:
        c, lim = counters[m.key], m.limits
        if m.outcome is Outcome.FAIL:
            parts.append(f"{m.result.reason} (failures {c.failures}, limit {lim.failure_limit})")
        elif m.outcome is Outcome.ERROR:
            parts.append(f"{m.result.reason} (errors {c.errors}, limit {lim.error_limit})")
        elif due:
            parts.append(
                f"{m.result.reason} (inconclusive {c.inconclusives}, limit {lim.inconclusive_limit})"
            )
        else:
            parts.append(m.result.reason)
    return tick.decide(Action.HOLD, f"{tick.label()}: " + "; ".join(parts or ["waiting"]))


def bandit_seed(rollout_id: str, step_index: int, tick: int) -> int:
    """The seed of a bandit tick's posterior draws: a hash of the rollout, step and tick, so
    the same tick of a resumed rollout draws (and decides) the same."""
    text = f"{rollout_id}/bandit/{step_index}/{tick}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def _bandit(tick: _Tick, step: BanditStep, elapsed: float, due: bool) -> Decision:
    """One bandit tick: assess the arms' rewards, then promote-on-confirmed-win, roll back on
    a confirmed loss or at ``max_duration_s``, or re-allocate the candidate's sticky weight."""
    s = tick.status
    obs = tick.obs
    assert obs is not None
    before = s.bandit or BanditState(weight_pct=s.route.weight_pct)
    stats = obs.rewards or (ArmStats(), ArmStats())
    policy = BanditPolicy(
        reward=step.reward,
        floor=step.floor,
        threshold=step.threshold,
        max_expected_loss=step.max_expected_loss,
        min_samples=step.min_samples,
        draws=step.draws,
    )
    n_tick = before.ticks + 1
    v = assess(stats, policy, np.random.default_rng(bandit_seed(s.rollout_id, s.step_index, n_tick)))
    if v.winner is None:
        leader, streak = None, 0
    else:
        leader, streak = v.winner, before.streak + 1 if v.winner == before.leader else 1
    target = round(v.weights[1] * 100.0, 2)
    state = BanditState(
        ticks=n_tick,
        leader=leader,
        streak=streak,
        weight_pct=s.route.weight_pct,
        n=tuple(a.n for a in stats),
        means=tuple(_none(m) for m in v.means),
        prob_best=v.prob_best,
        expected_loss=v.expected_loss,
    )
    tick.status = s = s.model_copy(update={"bandit": state})
    tick.bandit = state
    verdict = v.reason.replace("arm 0 ", "stable ").replace("arm 1 ", "candidate ")
    label = tick.label()

    def arm(i: int, name: str) -> str:
        mean = f"{v.means[i]:.4g}" if math.isfinite(v.means[i]) else "-"
        return (
            f"{name} mean {step.reward_metric} {mean} (n={stats[i].n}, P(best) {v.prob_best[i]:.3f}, "
            f"expected loss {v.expected_loss[i]:.4g})"
        )

    numbers = f"{arm(0, 'stable')}, {arm(1, 'candidate')}"
    if obs.forced:
        numbers += f"; {obs.forced} forced answers excluded"
    confirmed = leader is not None and streak >= step.confirm_ticks
    if confirmed and leader == 0:
        return tick.stop(
            Action.ROLLBACK,
            f"{label}: stable wins ({verdict}, on {streak} consecutive ticks): {numbers}",
        )
    guard = [m for m in tick.measurements if not m.limits.dry_run and m.outcome is not Outcome.PASS]
    if confirmed and leader == 1 and due and not guard:
        summary = "; ".join(m.result.reason for m in tick.measurements if not m.limits.dry_run)
        return tick.advance(
            f"{label}: candidate wins after {elapsed:.0f} s ({verdict}, on {streak} consecutive ticks): "
            f"{numbers}" + (f"; {summary}" if summary else "")
        )
    if elapsed >= step.max_duration_s:
        return tick.stop(
            Action.ROLLBACK,
            f"{label}: no winner within max_duration_s {step.max_duration_s:g} ({elapsed:.0f} s): "
            f"{verdict}: {numbers}",
        )
    waiting = []
    if confirmed:
        waiting.append(f"candidate leads on {streak} ticks")
        if not due:
            waiting.append(f"{elapsed:.0f} of {step.duration_s:g} s elapsed")
        waiting += [m.result.reason for m in guard]
    else:
        waiting.append(
            verdict + (f" (leader on {streak} of {step.confirm_ticks} ticks)" if leader is not None else "")
        )
    effects: tuple[Effect, ...] = ()
    if not confirmed and abs(target - s.route.weight_pct) >= max(step.min_weight_change_pct, 0.01):
        spec = tick.route("canary", weight_pct=target)
        effects = (
            tick.route_effect(
                f"step{s.step_index}.b{n_tick}", spec, f"re-allocate {label}", restarts_window=False
            ),
        )
        state = state.model_copy(update={"weight_pct": target})
        tick.bandit = state
        waiting.append(f"candidate weight {s.route.weight_pct:g}% -> {target:g}%")
    reason = f"{label}: " + "; ".join(waiting) + f"; {numbers}"
    return tick.decide(Action.HOLD, reason, effects=effects, bandit=state)


def record_release(status: RolloutStatus, version: int, last_good: int | None) -> RolloutStatus:
    """The status once the devices step's release is published: release ``version``, and
    ``last_good``, the release devices are restored to if a stage fails (persist it before
    marking the release effect applied)."""
    dev = status.device or DeviceState()
    if dev.release_version is not None and dev.release_version != version:
        raise RolloutError(
            f"rollout {status.rollout_id} already published release v{dev.release_version}, not v{version}"
        )
    return status.model_copy(
        update={"device": dev.model_copy(update={"release_version": version, "last_good": last_good})}
    )


def edge_plan(step: DeviceStep) -> EdgeConfig:
    """The OTA machine's plan for a devices step: its stages and counting limits."""
    return EdgeConfig(
        stages=step.stages, failure_limit=step.failure_limit, inconclusive_limit=step.inconclusive_limit
    )


def _devices(tick: _Tick, step: DeviceStep, sig: Signals) -> Decision:
    """One tick of the devices step: start the OTA rollout of the published release, then
    feed each cohort's telemetry gate to the OTA machine and carry out what it decides."""
    s = tick.status
    dev = s.device or DeviceState()
    label = tick.label()
    if dev.release_version is None:
        return tick.decide(Action.HOLD, f"{label}: waiting for the release of v{s.candidate_version}")
    plan = edge_plan(step)
    st = dev.ota_status()
    if st is None:
        d = ota.start(
            f"{s.rollout_id}-devices", s.model_name, dev.release_version, plan, last_good=dev.last_good
        )
        why = f"release v{dev.release_version} (model v{s.candidate_version}) published"
    elif sig.device_gate is None:
        return tick.decide(Action.HOLD, f"{label}: waiting for the cohort's device telemetry")
    else:
        d = ota.decide(st, sig.device_gate, plan)
        why = ""
    serves = dev.serves
    effects: list[Effect] = []
    for e in d.effects:
        if e.kind == "serve_cohort":
            serves += 1
            action = EdgeAction(action="serve_cohort", version=e.version, percent=e.percent)
            effects.append(tick.edge_effect(f"serve{serves}", action))
        elif e.kind == "mark_good":
            effects.append(tick.edge_effect("mark_good", EdgeAction(action="mark_good", version=e.version)))
        else:
            effects.append(tick.edge_effect("restore", EdgeAction(action="restore", version=e.version)))
    new_dev = dev.model_copy(update={"ota": d.status.to_dict(), "serves": serves})
    tick.status = s.model_copy(update={"device": new_dev})
    reason = f"{label}: " + (f"{why}; " if why else "") + d.reason
    if d.action is Action.PROMOTE:
        return tick.advance(
            f"{reason} (release v{dev.release_version} carries model v{s.candidate_version})",
            extra=tuple(effects),
        )
    if d.action in (Action.ROLLBACK, Action.ABORT):
        fleet = tuple(effects) or (tick.fleet_stop(None),)
        if step.on_device_failure == "rollback_server":
            return tick.stop(
                Action.ROLLBACK,
                f"{reason}; device stage failed, the plan says rollback_server",
                extra=fleet,
            )
        return tick.advance(
            f"{reason}; device stage failed: fleet halted (on_device_failure: halt_fleet)",
            extra=fleet,
            phase=Phase.ABORTED,
        )
    return tick.decide(d.action, reason, effects=tuple(effects), device=new_dev)


def _approval(tick: _Tick, sig: Signals) -> Decision:
    s = tick.status
    req = s.approval
    assert req is not None
    if tick.now >= req.deadline:
        valid = sig.approval is not None and sig.approval.version == s.candidate_version
        late = f" (an answer from {sig.approval.by} arrived after the deadline)" if valid else ""  # type: ignore[union-attr]
        return tick.stop(
            Action.ABORT,
            f"approval of v{s.candidate_version} timed out: no answer within "
            f"{(req.deadline - req.requested_at).total_seconds():g} s{late}; nothing promoted",
            phase=Phase.TIMED_OUT,
        )
    a = sig.approval
    if a is not None:
        who = a.by + (f" ({a.comment})" if a.comment else "")
        if a.version != s.candidate_version:
            tick.notes.append(
                f"approval refused: {who} answered for v{a.version}, this rollout tests "
                f"v{s.candidate_version}"
            )
        elif a.approved:
            return tick.advance(f"v{a.version} approved by {who}")
        else:
            return tick.stop(Action.ROLLBACK, f"v{a.version} rejected by {who}")
    left = req.remaining_s(tick.now)
    return tick.decide(
        Action.AWAIT_APPROVAL,
        f"{tick.label()}: waiting for approval of v{s.candidate_version}, {left:.0f} s left",
        ask=req,
    )


__all__ = [
    "Action",
    "ApprovalRequest",
    "ApprovalResponse",
    "Decision",
    "Effect",
    "Phase",
    "RolloutStatus",
    "RouteSpec",
    "Signals",
    "decide",
    "dump_status",
    "load_status",
    "mark_applied",
    "start",
    "fmt",
]
