"""The words every rollout uses, server or device: phases, actions, counters, decisions.

A server rollout (``mlops.rollout.machine``) and a device OTA rollout (``mlops.edge.ota``)
are two targets of one model: both persist a status with a ``Phase``, both answer a tick's
gate outcome (``PASS | FAIL | INCONCLUSIVE | ERROR``) with an ``Action`` and a reason, and
both count outcomes the same way, per check and per step, with ``tally``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, Protocol, TypeVar

from mlops.gates import Outcome
from mlops.settings import StrictModel


class Phase(StrEnum):
    """Where a rollout is. The last four are terminal."""

    PENDING = "pending"
    RUNNING = "running"
    AWAITING_APPROVAL = "awaiting_approval"
    PAUSED = "paused"
    PROMOTED = "promoted"  # cut over; post-promotion analysis and keep-warm window
    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"
    TIMED_OUT = "timed_out"


TERMINAL = frozenset({Phase.SUCCEEDED, Phase.ROLLED_BACK, Phase.ABORTED, Phase.TIMED_OUT})

LEGACY_PHASES: dict[str, Phase] = {
    "progressing": Phase.RUNNING,
    "completed": Phase.SUCCEEDED,
    "rolled-back": Phase.ROLLED_BACK,
}
"""Phase names that older OTA status files hold, and the phase each one means now."""


def parse_phase(value: str) -> Phase:
    """The phase named ``value``, accepting the spellings of older status files."""
    legacy = LEGACY_PHASES.get(value)
    return legacy if legacy is not None else Phase(value)


class Action(StrEnum):
    """What a decision does. ``advance``/``promote`` apply the next step's changes;
    ``rollback``/``abort`` send all traffic back to stable (and aliases back, after a
    promotion); ``pause`` keeps traffic and waits for an operator; ``hold`` changes
    nothing; ``await_approval`` asks a human (again, after a restart) and changes nothing."""

    ADVANCE = "advance"
    HOLD = "hold"
    PAUSE = "pause"
    ROLLBACK = "rollback"
    ABORT = "abort"
    PROMOTE = "promote"
    AWAIT_APPROVAL = "await_approval"


SEVERITY: dict[str, int] = {"rollback": 3, "abort": 2, "pause": 1}
"""When several checks trip in one tick, the most severe action wins."""


class Limits(Protocol):
    """How a check's outcomes are counted and what it does once past a limit."""

    failure_limit: int
    inconclusive_limit: int
    error_limit: int
    on_fail: str
    on_inconclusive: str


class Counters(StrictModel):
    """A check's counted outcomes in the current step."""

    failures: int = 0
    inconclusives: int = 0
    errors: int = 0


@dataclass(frozen=True)
class Tally:
    """One outcome counted: the new counters, and the action when a limit is passed."""

    counters: Counters
    trip: str | None  # "rollback", "abort" or "pause"; None while within the limits
    note: str  # e.g. "failures 3 > limit 2", or "" for a PASS


def tally(
    counters: Counters, outcome: Outcome, limits: Limits, *, due: bool = True, on_error: str = "abort"
) -> Tally:
    """Count ``outcome`` against ``limits``: FAIL adds a failure, ERROR an error, and
    INCONCLUSIVE an inconclusive only once the step is ``due`` (its observation time is up).

    A check trips when failures > failure_limit (-> ``on_fail``), errors > error_limit
    (-> ``on_error``) or inconclusives > inconclusive_limit (-> ``on_inconclusive``).
    """
    c = Counters(
        failures=counters.failures + (outcome is Outcome.FAIL),
        errors=counters.errors + (outcome is Outcome.ERROR),
        inconclusives=counters.inconclusives + (outcome is Outcome.INCONCLUSIVE and due),
    )
    if outcome is Outcome.FAIL:
        over = c.failures > limits.failure_limit
        rel = ">" if over else "<="
        return Tally(
            c, limits.on_fail if over else None, f"failures {c.failures} {rel} limit {limits.failure_limit}"
        )
    if outcome is Outcome.ERROR:
        over = c.errors > limits.error_limit
        rel = ">" if over else "<="
        return Tally(c, on_error if over else None, f"errors {c.errors} {rel} limit {limits.error_limit}")
    if outcome is Outcome.INCONCLUSIVE and due:
        over = c.inconclusives > limits.inconclusive_limit
        rel = ">" if over else "<="
        return Tally(
            c,
            limits.on_inconclusive if over else None,
            f"inconclusive {c.inconclusives} {rel} limit {limits.inconclusive_limit}",
        )
    return Tally(c, None, "")


S = TypeVar("S")
E = TypeVar("E")


@dataclass(frozen=True)
class Decision(Generic[S, E]):
    """The outcome of one tick: an action, its reason with the numbers, the next status
    (to persist *before* applying ``effects``) and the effects that carry it out."""

    action: Action
    reason: str
    status: S
    effects: tuple[E, ...] = ()
