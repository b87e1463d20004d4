"""`mlops rollout ...` (safe rollout of a challenger against the live service) and `mlops rollback`."""

from __future__ import annotations

import getpass
import os
from typing import Annotated

import typer

from mlops.errors import ConfigError
from mlops_cli.common import ConfigOpt, console, handle_errors, settings_for

rollout_app = typer.Typer(
    help="Roll a candidate out against the champion on the live service: replay, shadow, canary, A/B, approval, "
    "blue-green; gates decide, failures roll back.",
    invoke_without_command=True,
)


def print_summary(summary) -> None:
    """The rollout's outcome in three lines: phase and versions, the reason, the report."""
    colour = {"succeeded": "green", "rolled_back": "yellow", "aborted": "red", "timed_out": "yellow"}.get(
        summary.phase, "cyan"
    )
    console.print(
        f"[bold {colour}]rollout {summary.rollout_id}: {summary.phase}[/] "
        f"({summary.model_name} v{summary.candidate_version} vs v{summary.stable_version}, "
        f"{summary.seconds:.0f} s)"
    )
    console.print(f"  {summary.reason}", soft_wrap=True)
    console.print(f"  report: {summary.report}")


@rollout_app.callback()
@handle_errors
def rollout(
    ctx: typer.Context,
    plan: Annotated[str, typer.Option("--plan", help="Rollout plan YAML.")] = "configs/rollout/demo.yaml",
    candidate: Annotated[
        str, typer.Option("--candidate", help="Alias (or version number) of the candidate.")
    ] = "challenger",
    resume: Annotated[
        str | None, typer.Option("--resume", help="Continue the persisted rollout with this id.")
    ] = None,
    rollout_id: Annotated[
        str | None, typer.Option("--id", help="Id of a new rollout (default: time + random).")
    ] = None,
    auto: Annotated[
        str | None,
        typer.Option(
            "--auto-answer",
            help="Answer the approval step at once: approve | reject "
            "(demos and tests; default: pause for a human).",
        ),
    ] = None,
    max_seconds: Annotated[
        float | None, typer.Option("--max-seconds", help="Stop after this long (resumable).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Run a rollout flow (when no subcommand is given)."""
    if ctx.invoked_subcommand is not None:
        return
    if auto not in (None, "approve", "reject"):
        raise typer.BadParameter("--auto-answer takes approve or reject")
    import threading

    from flows.rollout import new_rollout_id, rollout_flow
    from tasks.rollout import utcnow

    settings = settings_for(config)
    rid = resume or rollout_id or new_rollout_id(utcnow())
    stop = threading.Event()
    view = threading.Thread(
        target=watch_rollout, args=(settings, rid), kwargs={"stop": stop}, name="rollout-view", daemon=True
    )
    view.start()
    try:
        summary = rollout_flow(
            plan=plan,
            candidate=candidate,
            resume=resume,
            rollout_id=None if resume else rid,
            approval=auto or "prefect",
            max_seconds=max_seconds,
            config=config,
        )
    finally:
        stop.set()
        view.join(timeout=10)
    print_summary(summary)
    if summary.phase not in ("succeeded",):
        raise typer.Exit(code=3 if summary.phase in ("rolled_back", "aborted", "timed_out") else 0)


def _answer(
    run_id: str, approved: bool, version: int | None, by: str | None, comment: str, config: str | None
) -> None:
    from uuid import UUID

    from mlops.errors import PlatformError

    settings = settings_for(config)
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(
            f"no Prefect server for {settings.home_path}: a paused run lives on a server; start one with "
            "`mlops server up` or set prefect.api_url"
        )
    from prefect.exceptions import ObjectNotFound
    from prefect.flow_runs import resume_flow_run

    run_input: dict[str, object] = {"approved": approved, "by": by or getpass.getuser(), "comment": comment}
    if version is not None:
        run_input["version"] = version
    try:
        resume_flow_run(UUID(run_id), run_input=run_input)
    except (ObjectNotFound, ValueError) as exc:
        raise PlatformError(f"no paused rollout run {run_id}: {exc}") from None
    except RuntimeError as exc:
        raise PlatformError(f"cannot answer run {run_id}: {exc}") from None
    console.print(f"{'approved' if approved else 'rejected'}: flow run {run_id} resumes")


@rollout_app.command("approve")
@handle_errors
def approve(
    run_id: Annotated[str, typer.Argument(help="Prefect flow run id of the paused rollout.")],
    version: Annotated[
        int | None, typer.Option("--version", help="The version you approve (default: the one shown).")
    ] = None,
    by: Annotated[str | None, typer.Option("--by", help="Who approves (default: your user name).")] = None,
    comment: Annotated[str, typer.Option("--comment")] = "",
    config: ConfigOpt = None,
) -> None:
    """Approve a rollout paused at its approval step (needs the Prefect server: mlops server up)."""
    _answer(run_id, True, version, by, comment, config)


@rollout_app.command("reject")
@handle_errors
def reject(
    run_id: Annotated[str, typer.Argument(help="Prefect flow run id of the paused rollout.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (goes into the decision log).")] = "",
    by: Annotated[str | None, typer.Option("--by", help="Who rejects (default: your user name).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Reject a rollout paused at its approval step: it rolls back."""
    _answer(run_id, False, None, by, reason, config)


@rollout_app.command("list")
@handle_errors
def list_cmd(config: ConfigOpt = None) -> None:
    """Persisted rollouts of this MLOPS_HOME, oldest first."""
    from mlops.rollout.machine import Phase
    from tasks.rollout import list_rollouts, utcnow

    now = utcnow()
    for s in list_rollouts(settings_for(config)):
        reason = s.final_reason or (s.history[-1].reason if s.history else "")
        if s.phase is Phase.AWAITING_APPROVAL and s.approval is not None and s.approval.deadline <= now:
            # its run stopped before it could record the timeout (e.g. the worker died while paused)
            reason = (
                f"approval deadline {s.approval.deadline:%Y-%m-%d %H:%M:%S} passed with no outcome recorded; "
                f"`mlops rollout --resume {s.rollout_id}` ends it timed_out"
            )
        console.print(
            f"{s.rollout_id}  {s.phase.value:<17} v{s.candidate_version} vs v{s.stable_version}  "
            f"{s.history[-1].step if s.history else '-'}  {s.updated_at:%Y-%m-%d %H:%M:%S}  {reason[:200]}",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )


def watch_rollout(settings, rollout_id: str, *, stop=None, interval: float = 1.0):
    """Show rollout ``rollout_id``'s live view from its files under MLOPS_HOME/rollouts/
    until it ends (or ``stop`` is set); its last status (``None``: it never appeared)."""
    from mlops_cli.rollout_view import follow
    from tasks.rollout import RolloutNotFound, read_plan, read_status

    plans = {}

    def load():
        try:
            status = read_status(settings, rollout_id)
            if rollout_id not in plans:
                plans[rollout_id] = read_plan(settings, rollout_id)
        except RolloutNotFound:
            return None
        return status, plans[rollout_id]

    return follow(load, console, interval=interval, stop=stop)


@rollout_app.command("watch")
@handle_errors
def watch(
    rollout_id: Annotated[str, typer.Argument(help="Id of the rollout (see `mlops rollout list`).")],
    interval: Annotated[
        float, typer.Option("--interval", min=0.01, help="Seconds between reads of its status.")
    ] = 1.0,
    config: ConfigOpt = None,
) -> None:
    """Follow a rollout started elsewhere until it ends: step, traffic, each gate's state,
    samples collected vs needed, time left. Exit code 0 if it succeeded, 3 if it rolled
    back, aborted or timed out."""
    from tasks.rollout import RolloutNotFound, read_status

    settings = settings_for(config)
    read_status(settings, rollout_id)  # an unknown id is an error now, not an endless wait
    status = watch_rollout(settings, rollout_id, interval=interval)
    if status is None:  # pragma: no cover - the status existed a moment ago
        raise RolloutNotFound(f"rollout {rollout_id!r} disappeared")
    reason = status.final_reason or ""
    console.print(
        f"rollout {status.rollout_id}: {status.phase.value}: {reason}", soft_wrap=True, markup=False
    )
    if status.phase.value != "succeeded":
        raise typer.Exit(code=3)


@handle_errors
def rollback(
    rollout_id: Annotated[
        str | None, typer.Option("--rollout", help="Rollout to undo (default: the latest).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Undo a rollout at once, skipping analysis: serving back to the old champion and, after a
    promotion, champion back to previous-champion (compare-and-set, audited)."""
    from flows.rollout import rollout_flow
    from tasks.rollout import RolloutNotFound, list_rollouts

    settings = settings_for(config)
    if rollout_id is None:
        done = list_rollouts(settings)
        if not done:
            raise RolloutNotFound(f"no rollout under {settings.home_path / 'rollouts'}")
        rollout_id = done[-1].rollout_id
    summary = rollout_flow(resume=rollout_id, command="rollback", config=config)
    print_summary(summary)


def register(app: typer.Typer) -> None:
    """Add the `rollout` command group and `rollback` to the `mlops` CLI."""
    app.add_typer(rollout_app, name="rollout")
    app.command("rollback")(rollback)
