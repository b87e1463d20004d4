"""Rollout flow: observe -> decide -> persist -> apply, once per tick, until the rollout ends.

The decisions are ``mlops.rollout.machine.decide`` (pure); this flow only sequences the
IO around it (tasks/rollout.py) in the write-ahead order of docs/design/rollout-model.md:

    finish effects left outstanding by a crash -> observe -> decide -> save status
    -> apply each effect, save status after each -> ask for approval if asked -> sleep

so a run killed at any point and restarted with ``resume=<id>`` continues at the same step
and never repeats a traffic change or an alias move.

Approval: with ``approval="prefect"`` the run pauses with ``pause_flow_run(
wait_for_input=ApprovalInput)``, so the Prefect UI (or ``mlops rollout approve|reject``)
shows a form with the evidence so far; the pause times out at the plan's deadline, which the
machine turns into TIMED_OUT (nothing promoted). ``approve``/``reject`` answer at once
(the demo and tests), and say so in the decision log.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.input import RunInput

from adapters.runtime import configure
from flows.params import CandidateParam, PlanParam
from mlops.errors import GateFailed
from mlops.gates import GateResult
from mlops.rollout.errors import ApprovalTimedOut, RolloutError
from mlops.rollout.machine import (
    ApprovalRequest,
    ApprovalResponse,
    Decision,
    Phase,
    RolloutStatus,
    Signals,
    decide,
    mark_applied,
    start,
)
from mlops.rollout.plan import DeviceStep, RolloutPlan, load_plan
from mlops.settings import Settings, load_settings
from serving.client import ServingAdmin, ServingClient
from tasks.rollout import (
    apply_effect,
    attach_report,
    build_references,
    challenger_version,
    observe_tick,
    offline_gate,
    read_plan,
    read_references,
    read_status,
    resolve_versions,
    save_plan,
    save_references,
    save_status,
    utcnow,
    write_report,
)

DEFAULT_PLAN = "configs/rollout/demo.yaml"
ApprovalMode = Literal["prefect", "approve", "reject"]


class ApprovalInput(RunInput):
    """The approve/reject form of a paused rollout (answer for the version shown)."""

    approved: bool = False
    version: int
    by: str = "prefect-ui"
    comment: str = ""


@dataclass(frozen=True)
class RolloutSummary:
    """How a server rollout run ended: its phase, final reason and report."""

    rollout_id: str
    model_name: str
    stable_version: int
    candidate_version: int
    phase: str
    reason: str
    report: str
    seconds: float


def new_rollout_id(now: datetime) -> str:
    """A fresh rollout id: the start time and a random suffix."""
    return f"{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def apply_all(
    settings: Settings,
    admin: ServingAdmin,
    status: RolloutStatus,
    plan: RolloutPlan | None = None,
    *,
    as_tasks: bool = True,
) -> RolloutStatus:
    """Apply the status's outstanding effects in order, persisting after each one.

    Fleet effects (a devices step's) go through ``flows.edge.apply_device_effect``, with the
    plan's devices step. ``as_tasks=False`` calls the effect function itself instead of
    running a Prefect task (for a run that can start no more tasks, see ``_time_out``)."""
    apply = apply_effect if as_tasks else apply_effect.fn
    for effect in status.outstanding:
        if effect.kind == "edge":
            from flows.edge import apply_device_effect

            step = plan.steps[status.step_index] if plan is not None else None
            if not isinstance(step, DeviceStep):
                raise RolloutError(f"fleet effect {effect.key} outside a devices step")
            status = apply_device_effect(settings, status, step, effect)
        else:
            apply(settings, admin, status, effect)
        status = mark_applied(status, effect.key, utcnow())
        save_status(settings, status)
    return status


def _time_out(
    settings: Settings, admin: ServingAdmin, status: RolloutStatus, plan: RolloutPlan, req: ApprovalRequest
) -> RolloutStatus:
    """Record an unanswered approval as timed out and undo its traffic change, without tasks.

    Once its pause has ended unanswered, this Prefect run is never Running again (the
    server's pause-expiry service may already have failed it). The timeout needs no
    observation, so it is decided, recorded and its revert applied here directly, whatever
    Prefect still allows such a run to do: through the usual observe/apply tasks, a
    deployment run whose pause the server had failed first ended with the rollout still
    recorded as awaiting approval and the candidate still in the route.
    """
    wait = (req.deadline - utcnow()).total_seconds()
    if wait > 0:  # the pause's own timer ended a moment early
        time.sleep(wait)
    d = decide(
        status,
        None,
        plan,
        utcnow(),
        Signals(approval=None, challenger_version=None, command=None, by="operator"),
    )
    save_status(settings, d.status)
    return apply_all(settings, admin, d.status, plan, as_tasks=False)


def ask_approval(req: ApprovalRequest, mode: ApprovalMode, seq: int) -> ApprovalResponse | None:
    """The human's answer (``None``: no answer before the deadline)."""
    if mode != "prefect":
        return ApprovalResponse(
            approved=mode == "approve",
            version=req.candidate_version,
            by=f"auto-{mode}",
            comment="answered automatically (demo/test mode), not by a human",
        )
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    evidence = "\n".join(f"- {part}" for part in req.evidence.split(" | ") if part)
    description = (
        f"### Approve {req.model_name} v{req.candidate_version} (stable v{req.stable_version})?\n\n"
        f"Rollout `{req.rollout_id}`, deadline {req.deadline.isoformat()}.\n\n"
        f"Evidence so far:\n{evidence or '- (none)'}\n\n"
        f"Set `approved` and answer for `version` {req.candidate_version}; a rejection rolls back."
    )
    timeout = max(1, math.ceil(req.remaining_s(utcnow())))
    try:
        answer = pause_flow_run(
            wait_for_input=ApprovalInput.with_initial_data(
                description=description, version=req.candidate_version
            ),
            timeout=timeout,
            poll_interval=2,
            key=f"approval-{req.rollout_id}-{seq}",
        )
    except FlowPauseTimeout:
        return None
    return ApprovalResponse(
        approved=answer.approved, version=answer.version, by=answer.by or "prefect-ui", comment=answer.comment
    )


def check_offline_gate(
    plan: RolloutPlan, gate: GateResult, candidate_version: int, stable_version: int
) -> str:
    """What the offline promotion gate's verdict means for a new rollout under ``plan``.

    Raises ``GateFailed`` when the candidate does not pass and the plan enforces the gate
    (the rollout would end by promoting a version the registry's own gate refuses);
    otherwise returns the line to log.
    """
    verdict = (
        f"offline promotion gate of v{candidate_version} against champion v{stable_version}: "
        f"{gate.outcome.value}: {gate.reason}"
    )
    if gate.passed:
        return verdict
    if plan.offline_gate == "enforce":
        raise GateFailed(
            f"{verdict}; plan {plan.name} enforces it, so no rollout starts "
            "(a plan with offline_gate: advisory lets the live gates alone decide)"
        )
    return f"{verdict}; advisory under plan {plan.name}: the live gates alone decide"


def _begin(settings: Settings, plan: RolloutPlan, candidate: str, rollout_id: str | None) -> RolloutStatus:
    now = utcnow()
    name, stable, cand, aliases = resolve_versions(settings, candidate)
    get_run_logger().info(check_offline_gate(plan, offline_gate(settings, name, cand), cand, stable))
    rid = rollout_id or new_rollout_id(now)
    status = start(
        rid, plan, model_name=name, stable_version=stable, candidate_version=cand, aliases=aliases, now=now
    )
    save_plan(settings, rid, plan)
    save_status(settings, status)
    save_references(settings, rid, build_references(settings, status))
    return status


@flow(name="rollout", log_prints=True)
def rollout_flow(
    plan: PlanParam = DEFAULT_PLAN,
    candidate: CandidateParam = "challenger",
    resume: str | None = None,
    rollout_id: str | None = None,
    approval: ApprovalMode = "prefect",
    command: Literal["rollback", "abort"] | None = None,
    max_seconds: float | None = None,
    config: str | None = None,
) -> RolloutSummary:
    """Roll the ``candidate`` alias's version out against the champion under ``plan``.

    ``resume``: continue the persisted rollout with that id (its own plan). ``command``:
    an operator's rollback/abort of that rollout (after promotion: aliases and serving back
    to the previous champion at once). ``max_seconds`` bounds the run (the rollout stays
    resumable).

    Args:
        plan: Rollout plan YAML, e.g. configs/rollout/demo.yaml or configs/rollout/production.yaml.
        candidate: Registry alias (or version number) of the version to roll out.
        resume: Id of a persisted rollout to continue (its own plan is used).
        rollout_id: Id for a new rollout (default: time + random).
        approval: prefect pauses for a person; approve or reject answer at once (demos, tests).
        command: rollback or abort the rollout named by resume.
        max_seconds: Stop after this long; the rollout stays resumable.
        config: Platform config YAML (default: $MLOPS_CONFIG, else built-in defaults).
    """
    logger = get_run_logger()
    settings = load_settings(config)
    configure(settings)
    started = time.monotonic()
    if resume:
        status = read_status(settings, resume)
        the_plan = read_plan(settings, resume)
        logger.info(
            "resuming rollout %s at %s (%s)",
            resume,
            status.phase.value,
            status.history[-1].step if status.history else "start",
        )
    else:
        the_plan = load_plan(plan)
        status = _begin(settings, the_plan, candidate, rollout_id)
        logger.info(
            "rollout %s: v%d against champion v%d, plan %s",
            status.rollout_id,
            status.candidate_version,
            status.stable_version,
            the_plan.name,
        )
    refs = read_references(settings, status.rollout_id)
    answer: ApprovalResponse | None = None
    tasks_ok = True  # False once an unanswered pause has left the run unable to start tasks
    with ServingClient.for_settings(settings) as admin:
        status = apply_all(settings, admin, status, the_plan)  # left over by a crash
        while True:
            tick_started = time.monotonic()
            now = utcnow()
            obs = None if status.terminal or command else observe_tick(settings, status, the_plan, refs, now)
            step = the_plan.steps[min(status.step_index, len(the_plan.steps) - 1)]
            gate = None
            if isinstance(step, DeviceStep) and not status.terminal and not command:
                from flows.edge import device_gate

                gate = device_gate(settings, status, step)
            signals = Signals(
                approval=answer,
                challenger_version=challenger_version(settings, status.model_name),
                device_gate=gate,
                command=command,
                by="operator",
            )
            answer = None
            d: Decision = decide(status, obs, the_plan, now, signals)
            if d.status != status:
                save_status(settings, d.status)  # write-ahead: the intent is durable before acting
            if d.action.value != "hold" or d.effects:
                logger.info("%s: %s", d.action.value, d.reason)
            status = apply_all(settings, admin, d.status, the_plan)
            command = None
            if status.terminal:
                break
            if d.approval is not None and status.phase is Phase.AWAITING_APPROVAL:
                answer = ask_approval(d.approval, approval, status.seq)
                if answer is None:
                    logger.info(
                        "no answer to the approval of v%d before its deadline", status.candidate_version
                    )
                    status = _time_out(settings, admin, status, the_plan, d.approval)
                    tasks_ok = False
                    break
                continue
            if max_seconds is not None and time.monotonic() - started > max_seconds:
                logger.warning(
                    "stopping after %.0f s; resume with: mlops rollout --resume %s",
                    max_seconds,
                    status.rollout_id,
                )
                break
            time.sleep(max(0.0, the_plan.tick_interval_s - (time.monotonic() - tick_started)))
    report = write_report(settings, status, the_plan)
    _publish(settings, status, report, as_tasks=tasks_ok)
    reason = status.final_reason or (status.history[-1].reason if status.history else "")
    logger.info("rollout %s ended %s: %s", status.rollout_id, status.phase.value, reason)
    if status.phase is Phase.TIMED_OUT:
        raise ApprovalTimedOut(f"rollout {status.rollout_id}: {reason} (report: {report})")
    return RolloutSummary(
        status.rollout_id,
        status.model_name,
        status.stable_version,
        status.candidate_version,
        status.phase.value,
        reason,
        str(report),
        time.monotonic() - started,
    )


def _publish(settings: Settings, status: RolloutStatus, report: Path, *, as_tasks: bool = True) -> None:
    """The report as artifacts: a link and a summary table on the Prefect run, a file on the
    candidate version's MLflow run."""
    run_id = (attach_report if as_tasks else attach_report.fn)(settings, status, report)
    rows = "\n".join(
        f"| {h.at:%H:%M:%S} | {h.step} | {h.action.value} | {h.reason[:300].replace('|', '/')} |"
        for h in status.history
        if h.action.value != "hold"
    )
    create_link_artifact(
        link=report.resolve().as_uri(),
        link_text=f"rollout report {status.rollout_id}",
        key=f"rollout-report-{status.rollout_id}".lower().replace("_", "-")[:100],
        description=f"{status.phase.value}: v{status.candidate_version} vs v{status.stable_version}",
    )
    create_markdown_artifact(
        markdown=(
            f"## Rollout {status.rollout_id}: {status.phase.value}\n\n{status.final_reason or ''}\n\n"
            f"Report: `{report}`"
            + (f" (also on MLflow run `{run_id}`)" if run_id else "")
            + f"\n\n| at | step | action | reason |\n|---|---|---|---|\n{rows}\n"
        ),
        description=f"rollout {status.rollout_id}",
    )
