"""Safe rollout of a candidate model: plans, observations, gates, the decision machine.

Pure logic (no Prefect, MLflow, BentoML, DuckDB or HTTP): the rollout flow reads the
prediction log and the registry through adapters, calls these functions, and applies what
they decide through adapters.

- ``vocabulary``: phases, actions, counters and ``tally``, shared with the device OTA
  rollout (``mlops.edge.ota``).
- ``plan``: ``load_plan(path) -> RolloutPlan`` (configs/rollout/*.yaml).
- ``observe``: ``observe(log, feedback, ...) -> Observations`` from a window of the
  prediction log; ``observe_replay`` for the offline comparison; ``Reference`` for drift.
- ``machine``: ``start(...) -> RolloutStatus``, ``decide(status, observations, plan, now,
  signals) -> Decision``, ``mark_applied``, ``dump_status``/``load_status``.
- ``abtest``: sample size, the always-valid mSPRT, the SRM check.
- ``gate``: one tick's measurements of a step's checks.
- ``simulator``: seeded traffic, delayed labels, candidate pathologies, and an in-process
  stand-in for the serving layer.
- ``report``: the HTML report of a rollout (imports matplotlib; import it explicitly).
"""

from mlops.rollout.machine import (
    Action,
    ApprovalRequest,
    ApprovalResponse,
    Decision,
    Effect,
    Phase,
    RolloutStatus,
    RouteSpec,
    Signals,
    decide,
    dump_status,
    load_status,
    mark_applied,
    start,
)
from mlops.rollout.observe import Observations, Reference, observe, observe_replay
from mlops.rollout.plan import RolloutPlan, load_plan

__all__ = [
    "Action",
    "ApprovalRequest",
    "ApprovalResponse",
    "Decision",
    "Effect",
    "Observations",
    "Phase",
    "Reference",
    "RolloutPlan",
    "RolloutStatus",
    "RouteSpec",
    "Signals",
    "decide",
    "dump_status",
    "load_plan",
    "load_status",
    "mark_applied",
    "observe",
    "observe_replay",
    "start",
]
