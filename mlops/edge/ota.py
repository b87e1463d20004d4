"""The staged OTA rollout as a pure state machine, in the rollout vocabulary.

``start(...)`` and ``decide(status, gate, plan)`` return a ``Decision``: an action, its
reason, the next status and the effects that carry it out (serve a cohort, record the last
good release, restore it). Nothing here touches a device, a file or a database; the flow
persists the status and applies the effects through tasks. Phases, actions and counting
are those of the server rollout (``mlops.rollout.vocabulary``); see
docs/design/rollout-model.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from mlops.edge.errors import RolloutConflict
from mlops.gates import GateResult, Outcome
from mlops.rollout.vocabulary import TERMINAL, Action, Counters, Decision, Phase, parse_phase, tally
from mlops.settings import EdgeConfig


@dataclass(frozen=True)
class OtaLimits:
    """The counting limits of a stage's gate: FAIL and ERROR both roll back past
    ``failure_limit``; INCONCLUSIVE aborts past ``inconclusive_limit``."""

    failure_limit: int
    inconclusive_limit: int
    error_limit: int
    on_fail: str = "rollback"
    on_inconclusive: str = "abort"

    @classmethod
    def of(cls, plan: EdgeConfig) -> OtaLimits:
        """The limits an edge config sets."""
        return cls(plan.failure_limit, plan.inconclusive_limit, plan.failure_limit)


@dataclass(frozen=True)
class OtaEffect:
    """One change to the fleet or the release repository.

    ``serve_cohort``: serve release ``version`` to a ``percent`` cohort and let devices
    poll. ``mark_good``: record ``version`` as the last good release. ``restore``: publish a
    release carrying ``version``'s model, serve it to every device and mark it good.
    """

    kind: Literal["serve_cohort", "mark_good", "restore"]
    version: int
    percent: float = 100.0

    def describe(self) -> str:
        """The effect in words, for logs."""
        if self.kind == "serve_cohort":
            return f"serve v{self.version} to {self.percent:g}% of the fleet"
        if self.kind == "mark_good":
            return f"record v{self.version} as the last good release"
        return f"publish a release restoring v{self.version}'s model to every device"


@dataclass(frozen=True)
class StageRecord:
    """One decision of the rollout, as history."""

    stage: int
    percent: float
    action: str
    outcome: str
    reason: str


@dataclass(frozen=True)
class RolloutStatus:
    """Where a rollout stands; persisted between stages. ``last_good`` is the release
    devices are restored to on rollback (``None``: there is none)."""

    rollout_id: str
    model: str
    version: int
    stages: tuple[float, ...]
    stage: int = 0
    phase: Phase = Phase.RUNNING
    counters: Counters = field(default_factory=Counters)
    last_good: int | None = None
    history: tuple[StageRecord, ...] = field(default_factory=tuple)

    @property
    def percent(self) -> float:
        """The cohort of the current stage, in percent of the fleet."""
        return self.stages[self.stage]

    @property
    def done(self) -> bool:
        """Whether the rollout has ended (nothing more to decide)."""
        return self.phase in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        """The status as JSON-ready data."""
        data = asdict(self)
        data["phase"] = self.phase.value
        data["counters"] = self.counters.model_dump()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutStatus:
        """A status from ``to_dict`` data, including files of the older spelling
        (``rolled-back``/``progressing``/``completed``, ``failures``/``inconclusives``)."""
        try:
            counters = data.get("counters") or {
                "failures": int(data.get("failures", 0)),
                "inconclusives": int(data.get("inconclusives", 0)),
            }
            last_good = data.get("last_good")
            return cls(
                rollout_id=data["rollout_id"],
                model=data["model"],
                version=int(data["version"]),
                stages=tuple(float(s) for s in data["stages"]),
                stage=int(data["stage"]),
                phase=parse_phase(data["phase"]),
                counters=Counters.model_validate(counters),
                last_good=None if last_good is None else int(last_good),
                history=tuple(StageRecord(**h) for h in data["history"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RolloutConflict(f"rollout status cannot be read: {exc}") from None


OtaDecision = Decision[RolloutStatus, OtaEffect]


def start(
    rollout_id: str, model: str, version: int, plan: EdgeConfig, last_good: int | None = None
) -> OtaDecision:
    """The decision that starts a rollout of ``version``: serve it to the first cohort."""
    status = RolloutStatus(rollout_id, model, version, plan.stages, last_good=last_good)
    stages = "/".join(f"{s:g}%" for s in plan.stages)
    return Decision(
        Action.ADVANCE,
        f"rollout of v{version} started: stages {stages}",
        status,
        (OtaEffect("serve_cohort", version, status.percent),),
    )


def decide(status: RolloutStatus, gate: GateResult, plan: EdgeConfig) -> OtaDecision:
    """What to do after observing the current stage, and the status after doing it.

    PASS advances to the next stage (or promotes after the last); FAIL and ERROR are
    counted and past the limit roll back (restoring the last good release, if any);
    INCONCLUSIVE is counted and past its limit aborts where the rollout stands. Below a
    limit the stage holds and is observed again.
    """
    if status.done:
        raise RolloutConflict(f"rollout {status.rollout_id} is {status.phase.value}; nothing to decide")
    if status.stages != plan.stages:
        raise RolloutConflict(
            f"rollout {status.rollout_id} started with stages {status.stages}, plan now has {plan.stages}"
        )
    outcome = gate.outcome
    pct = f"{status.percent:g}%"
    t = tally(status.counters, outcome, OtaLimits.of(plan), on_error="rollback")
    serve_again = (OtaEffect("serve_cohort", status.version, status.percent),)
    if t.trip == "rollback":
        reason = f"{gate.reason} ({t.note})"
        if status.last_good is None:
            reason += "; no earlier good release to restore: the rollout is halted where it stood"
            effects: tuple[OtaEffect, ...] = ()
        else:
            reason += f"; restoring v{status.last_good} on every device"
            effects = (OtaEffect("restore", status.last_good),)
        return _decided(
            status, Action.ROLLBACK, outcome, reason, t.counters, effects, phase=Phase.ROLLED_BACK
        )
    if t.trip == "abort":
        reason = f"{gate.reason} ({t.note}); nothing was rolled back"
        return _decided(status, Action.ABORT, outcome, reason, t.counters, (), phase=Phase.ABORTED)
    if outcome is Outcome.INCONCLUSIVE:
        reason = f"{gate.reason} ({t.note})"
        return _decided(status, Action.HOLD, outcome, reason, t.counters, serve_again)
    if outcome is not Outcome.PASS:
        reason = f"{gate.reason} ({t.note}; observing again)"
        return _decided(status, Action.HOLD, outcome, reason, t.counters, serve_again)
    if status.stage + 1 >= len(status.stages):
        reason = f"stage {pct} passed: every device runs v{status.version}"
        effects = (OtaEffect("mark_good", status.version),)
        return _decided(status, Action.PROMOTE, outcome, reason, t.counters, effects, phase=Phase.SUCCEEDED)
    nxt = status.stages[status.stage + 1]
    reason = f"stage {pct} passed ({gate.reason}); widening to {nxt:g}%"
    return _decided(
        status,
        Action.ADVANCE,
        outcome,
        reason,
        Counters(),
        (OtaEffect("serve_cohort", status.version, nxt),),
        stage=status.stage + 1,
    )


def _decided(
    status: RolloutStatus,
    action: Action,
    outcome: Outcome,
    reason: str,
    counters: Counters,
    effects: tuple[OtaEffect, ...],
    **update: Any,
) -> OtaDecision:
    record = StageRecord(status.stage, status.percent, action.value, outcome.value, reason)
    new = replace(status, counters=counters, history=status.history + (record,), **update)
    return Decision(action, reason, new, effects)
