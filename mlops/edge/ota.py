"""The staged OTA rollout as a pure state machine.

``decide(status, gate, plan) -> Decision`` reads the status of a rollout and the verdict of
the current stage's telemetry gate and says what to do, with a reason; ``advance(status,
decision)`` is the status after doing it. Nothing here touches a device, a file or a
database: the rollout flow reads telemetry, calls ``decide``, applies the decision through
adapters and persists the new status.

Stages widen the cohort (default 1% -> 10% -> 50% -> 100%). Per stage:

- PASS: ``advance`` to the next stage, or ``promote`` after the last (rollout complete);
- FAIL or ERROR: counted; past ``failure_limit`` -> ``rollback`` (halt, and restore the last
  good model on the devices that took this release), else ``hold`` and observe again;
- INCONCLUSIVE (too few reports): counted; past ``inconclusive_limit`` -> ``abort``
  (halt where it stands: nothing shows the release is bad, nothing shows it is good).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any

from mlops.edge.errors import RolloutConflict
from mlops.gates import GateResult, Outcome
from mlops.settings import EdgeConfig


class Action(str, Enum):
    ADVANCE = "advance"
    HOLD = "hold"
    ROLLBACK = "rollback"
    ABORT = "abort"
    PROMOTE = "promote"


class Phase(str, Enum):
    PROGRESSING = "progressing"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled-back"
    ABORTED = "aborted"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    outcome: str = ""


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
    """Where a rollout stands; persisted between stages."""

    rollout_id: str
    model: str
    version: int
    stages: tuple[float, ...]
    stage: int = 0
    phase: Phase = Phase.PROGRESSING
    failures: int = 0
    inconclusives: int = 0
    history: tuple[StageRecord, ...] = field(default_factory=tuple)

    @property
    def percent(self) -> float:
        return self.stages[self.stage]

    @property
    def done(self) -> bool:
        return self.phase is not Phase.PROGRESSING

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["phase"] = self.phase.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutStatus:
        try:
            return cls(
                rollout_id=data["rollout_id"],
                model=data["model"],
                version=int(data["version"]),
                stages=tuple(float(s) for s in data["stages"]),
                stage=int(data["stage"]),
                phase=Phase(data["phase"]),
                failures=int(data["failures"]),
                inconclusives=int(data["inconclusives"]),
                history=tuple(StageRecord(**h) for h in data["history"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RolloutConflict(f"rollout status cannot be read: {exc}") from None


def start(rollout_id: str, model: str, version: int, plan: EdgeConfig) -> RolloutStatus:
    return RolloutStatus(rollout_id, model, version, plan.stages)


def decide(status: RolloutStatus, gate: GateResult, plan: EdgeConfig) -> Decision:
    """What to do after observing the current stage."""
    if status.done:
        raise RolloutConflict(f"rollout {status.rollout_id} is {status.phase.value}; nothing to decide")
    if status.stages != plan.stages:
        raise RolloutConflict(
            f"rollout {status.rollout_id} started with stages {status.stages}, plan now has {plan.stages}"
        )
    outcome = gate.outcome
    pct = f"{status.percent:g}%"
    if outcome in (Outcome.FAIL, Outcome.ERROR):
        n = status.failures + 1
        if n > plan.failure_limit:
            return Decision(
                Action.ROLLBACK, f"{gate.reason} (failures {n} > limit {plan.failure_limit})", outcome.value
            )
        return Decision(
            Action.HOLD,
            f"{gate.reason} (failures {n} <= limit {plan.failure_limit}; observing again)",
            outcome.value,
        )
    if outcome is Outcome.INCONCLUSIVE:
        n = status.inconclusives + 1
        if n > plan.inconclusive_limit:
            return Decision(
                Action.ABORT,
                f"{gate.reason} (inconclusive {n} > limit {plan.inconclusive_limit})",
                outcome.value,
            )
        return Decision(
            Action.HOLD, f"{gate.reason} (inconclusive {n} <= limit {plan.inconclusive_limit})", outcome.value
        )
    if status.stage + 1 >= len(status.stages):
        return Decision(
            Action.PROMOTE, f"stage {pct} passed: every device runs v{status.version}", outcome.value
        )
    nxt = f"{status.stages[status.stage + 1]:g}%"
    return Decision(Action.ADVANCE, f"stage {pct} passed ({gate.reason}); widening to {nxt}", outcome.value)


def advance(status: RolloutStatus, decision: Decision) -> RolloutStatus:
    """The status after applying ``decision``."""
    record = StageRecord(
        status.stage, status.percent, decision.action.value, decision.outcome, decision.reason
    )
    s = replace(status, history=status.history + (record,))
    if decision.action is Action.ADVANCE:
        return replace(s, stage=status.stage + 1, failures=0, inconclusives=0)
    if decision.action is Action.HOLD:
        if decision.outcome == Outcome.INCONCLUSIVE.value:
            return replace(s, inconclusives=status.inconclusives + 1)
        return replace(s, failures=status.failures + 1)
    if decision.action is Action.PROMOTE:
        return replace(s, phase=Phase.COMPLETED)
    if decision.action is Action.ROLLBACK:
        return replace(s, phase=Phase.ROLLED_BACK, failures=status.failures + 1)
    return replace(s, phase=Phase.ABORTED, inconclusives=status.inconclusives + 1)
