"""Errors of the rollout package.

Every one is a ``PlatformError``, so the CLI turns it into one line and an exit code. A gate
that fails is *not* an error: it is an outcome, and ``decide`` answers it with a decision.
These are raised only when the caller breaks the contract of the state machine.
"""

from __future__ import annotations

from mlops.errors import PlatformError


class RolloutError(PlatformError):
    """Base of the rollout package's errors: the inputs of a decision are inconsistent."""

    exit_code = 7


class PlanMismatch(RolloutError):
    """``decide`` was given a plan other than the one the rollout started with.

    Step indices and counters in a persisted status only mean something under the plan
    they were made with; a changed plan needs a new rollout.
    """


class ObservationMismatch(RolloutError):
    """Observations describe other model versions, or start before the current step's
    traffic change, so they are not evidence about the step being analysed."""


class StatusFormatError(RolloutError):
    """A persisted rollout status cannot be read: not JSON, a wrong field, or a schema
    version this code does not know."""


class ApprovalTimedOut(PlatformError):
    """Nobody answered the approval step before the plan's deadline.

    Not a contract error: the rollout ended ``timed_out`` with nothing promoted and its
    report written. The flow run still ends Failed, as Prefect ends an expired pause, so
    the run list shows it as one that needs a person.
    """

    exit_code = 3
