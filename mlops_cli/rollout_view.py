"""The live view of a rollout: where it is, each gate's state, samples so far and time left.

Built only from what a rollout persists (``rollouts/<id>/status.json`` and ``plan.json``),
so the same view follows a rollout run by this process (``mlops rollout``, ``mlops demo``)
or one started elsewhere (``mlops rollout watch ID``). ``build_view`` is pure; ``render``
turns a view into a rich table; ``follow`` re-reads the files until the rollout ends, as a
live table on a terminal and as one line per change (and a heartbeat) elsewhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from mlops.rollout.machine import Action, Phase, Record, RolloutStatus
from mlops.rollout.plan import (
    ABStep,
    ApprovalStep,
    BlueGreenStep,
    CanaryStep,
    GateLimits,
    RolloutPlan,
    Step,
    step_label,
)

TRAFFIC_CHECK = "candidate_traffic"
SRM_CHECK = "sample_ratio"
STALE_AFTER_TICKS = 12  # no new status for this many ticks: say the runner may be gone


@dataclass(frozen=True)
class GateRow:
    """One gate of the current step: its last outcome, samples collected vs needed, counters."""

    name: str
    outcome: str  # PASS | FAIL | INCONCLUSIVE | ERROR, or "waiting" before its first measurement
    samples: int
    needed: int
    failures: str  # "1/2": failures so far / limit
    inconclusives: str
    dry_run: bool
    reason: str


@dataclass(frozen=True)
class RolloutView:
    """Everything the live view shows about a rollout at one moment."""

    rollout_id: str
    model_name: str
    candidate_version: int
    stable_version: int
    phase: str
    step_number: int  # 1-based
    step_count: int
    step: str
    route: str
    candidate_pct: float
    step_elapsed_s: float
    step_left_s: float | None  # until the step may complete (its duration, or the approval deadline)
    samples_eta_s: float | None  # at the step's sample rate so far, until every gate has the samples it needs
    rollout_left_s: float  # the plan's remaining minimum: this step's and every later step's duration
    gates: tuple[GateRow, ...]
    ab: str | None
    last_action: str
    decisions: int  # decisions other than hold so far: a change of this number is news
    reason: str
    terminal: bool
    stale_s: float | None  # seconds since the last status update, when it looks stale

    def line(self) -> str:
        """The view as one line of text (for logs and terminals without live display)."""
        left = f", {self.step_left_s:.0f} s left in step" if self.step_left_s is not None else ""
        if self.samples_eta_s is not None:
            left += f", ~{self.samples_eta_s:.0f} s more for the samples the gates need"
        head = (
            f"rollout {self.rollout_id} [{self.step_number}/{self.step_count}] {self.step}: {self.phase}"
            f" ({self.step_elapsed_s:.0f} s{left}, plan minimum {self.rollout_left_s:.0f} s to go)"
        )
        gates = "; ".join(f"{g.name} {g.outcome} {g.samples}/{g.needed}" for g in self.gates if not g.dry_run)
        return head + (f" | {gates}" if gates else "") + (f" | {self.ab}" if self.ab else "")


def _duration(step: Step) -> float:
    if isinstance(step, BlueGreenStep):
        return max(step.duration_s, step.keep_warm_s)
    if isinstance(step, ApprovalStep):
        return 0.0
    return step.duration_s


def _remaining_after(plan: RolloutPlan, status: RolloutStatus) -> float:
    """The durations still ahead after the current step (or canary weight)."""
    total = 0.0
    step = plan.steps[status.step_index]
    if isinstance(step, CanaryStep):
        total += step.duration_s * (len(step.weights) - status.weight_index - 1)
    for later in plan.steps[status.step_index + 1 :]:
        weights = len(later.weights) if isinstance(later, CanaryStep) else 1
        total += _duration(later) * weights
    return total


def _gate_limits(step: Step) -> list[tuple[str, GateLimits, bool]]:
    """``(key, limits, dry_run)`` of every gate ``step`` measures, in the machine's order."""
    out: list[tuple[str, GateLimits, bool]] = [(c.key, c, c.dry_run) for c in step.checks]
    if step.kind in ("shadow", "canary", "ab", "blue_green"):  # the steps the machine checks traffic of
        counted = [c.inconclusive_limit for c in step.checks if not c.dry_run]
        if isinstance(step, ABStep):
            counted += [step.primary.inconclusive_limit, step.srm.inconclusive_limit]
        traffic = GateLimits(
            min_samples=step.min_samples,  # type: ignore[union-attr]
            inconclusive_limit=max(counted, default=0),
        )
        out.append((TRAFFIC_CHECK, traffic, False))
    if isinstance(step, ABStep):
        out.append((SRM_CHECK, step.srm, False))
        out.append((step.primary.key, step.primary, False))
    return out


def _current_record(status: RolloutStatus, label: str) -> Record | None:
    """The newest measurement of the current step (an ``advance`` record carries the
    previous step's measurements under the new step's name, so it does not count)."""
    for r in reversed(status.history):
        if r.step_index != status.step_index or r.step != label:
            return None
        if r.action in (Action.HOLD, Action.AWAIT_APPROVAL, Action.PAUSE) and r.checks:
            return r
    return None


def _samples_eta(gates: list[GateRow], elapsed: float) -> float | None:
    """Seconds until the slowest counted gate has its samples, at the rate seen so far in
    the step (``None`` when no gate is short of samples or none has started counting)."""
    etas = [
        (g.needed - g.samples) * elapsed / g.samples
        for g in gates
        if not g.dry_run and g.outcome != "PASS" and 0 < g.samples < g.needed and elapsed > 0
    ]
    return max(etas) if etas else None


def build_view(status: RolloutStatus, plan: RolloutPlan, now: datetime) -> RolloutView:
    """The live view of ``status`` (run under ``plan``) at ``now``."""
    index = min(status.step_index, len(plan.steps) - 1)
    step = plan.steps[index]
    label = step_label(plan, index)
    if isinstance(step, CanaryStep):
        label = f"{label} {step.weights[status.weight_index]:g}% (weight {status.weight_index + 1}/{len(step.weights)})"
    started = status.step_started_at
    elapsed = max(0.0, (now - started).total_seconds()) if started else 0.0
    record = _current_record(status, status.history[-1].step) if status.history else None
    measured = {c.key: c for c in record.checks} if record else {}

    gates = []
    for key, limits, dry in _gate_limits(step):
        c = measured.get(key)
        needed = limits.min_samples
        if record is not None and record.ab is not None and key == step.primary.key:  # type: ignore[union-attr]
            needed = max(needed, record.ab.n_required or 0)
        gates.append(
            GateRow(
                name=key,
                outcome=c.outcome.value if c else "waiting",
                samples=c.samples if c else 0,
                needed=needed,
                failures=f"{c.failures if c else 0}/{limits.failure_limit}",
                inconclusives=f"{c.inconclusives if c else 0}/{limits.inconclusive_limit}",
                dry_run=dry,
                reason=c.reason if c else "no measurement yet",
            )
        )

    step_left: float | None = None
    if status.phase is Phase.AWAITING_APPROVAL and status.approval is not None:
        step_left = status.approval.remaining_s(now)
    elif not status.terminal and status.phase is not Phase.PENDING:
        step_left = max(0.0, _duration(step) - elapsed) if started else _duration(step)
    eta = _samples_eta(gates, elapsed) if not status.terminal else None
    here = max(step_left or 0.0, eta or 0.0)
    ahead = 0.0 if status.terminal else _remaining_after(plan, status) + here

    ab = None
    if record is not None and record.ab is not None:
        a = record.ab
        imp = "-" if a.improvement is None else f"{a.improvement:+.4f}"
        ci = "" if a.ci_low is None or a.ci_high is None else f" [{a.ci_low:+.4f}, {a.ci_high:+.4f}]"
        ab = f"A/B {a.metric}: improvement {imp}{ci}, {a.n_stable} stable / {a.n_candidate} candidate" + (
            f" of {a.n_required} per arm" if a.n_required else ""
        )
    last = status.history[-1] if status.history else None
    quiet = (now - status.updated_at).total_seconds()
    stale = quiet if not status.terminal and quiet > STALE_AFTER_TICKS * plan.tick_interval_s else None
    return RolloutView(
        rollout_id=status.rollout_id,
        model_name=status.model_name,
        candidate_version=status.candidate_version,
        stable_version=status.stable_version,
        phase=status.phase.value,
        step_number=index + 1,
        step_count=len(plan.steps),
        step=label,
        route=status.route.describe(),
        candidate_pct=status.route.candidate_pct,
        step_elapsed_s=elapsed,
        step_left_s=step_left,
        samples_eta_s=eta,
        rollout_left_s=ahead,
        gates=tuple(gates),
        ab=ab,
        last_action=last.action.value if last else "-",
        decisions=sum(r.action is not Action.HOLD for r in status.history),
        reason=status.final_reason or (last.reason if last else "starting"),
        terminal=status.terminal,
        stale_s=stale,
    )


_COLOURS = {"PASS": "green", "FAIL": "red", "INCONCLUSIVE": "yellow", "ERROR": "red", "waiting": "dim"}
_PHASE_COLOURS = {"succeeded": "green", "rolled_back": "yellow", "aborted": "red", "timed_out": "yellow"}


def render(view: RolloutView) -> Group:
    """The view as a rich renderable: a header and a table of the current step's gates."""
    colour = _PHASE_COLOURS.get(view.phase, "cyan")
    left = "" if view.step_left_s is None else f"  ·  {view.step_left_s:.0f} s left in step"
    if view.samples_eta_s is not None:
        left += f"  ·  ~{view.samples_eta_s:.0f} s more for the samples the gates need"
    head = Table.grid(padding=(0, 1))
    head.add_row(
        f"[bold]rollout {view.rollout_id}[/]  {view.model_name} v{view.candidate_version} vs v{view.stable_version}"
        f"  ·  [bold {colour}]{view.phase}[/]"
    )
    head.add_row(
        f"step [bold]{view.step_number}/{view.step_count} {view.step}[/]  ·  {view.route}"
        f"  ·  {view.step_elapsed_s:.0f} s in step{left}  ·  plan minimum {view.rollout_left_s:.0f} s to go"
    )
    if view.stale_s is not None:
        head.add_row(
            f"[yellow]no status update for {view.stale_s:.0f} s: is the rollout's run still alive?[/]"
        )
    table = Table(show_edge=False, pad_edge=False, expand=False)
    for col, justify in (
        ("gate", "left"),
        ("state", "left"),
        ("samples", "right"),
        ("needed", "right"),
        ("fail", "right"),
        ("inconcl.", "right"),
        ("last measurement", "left"),
    ):
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for g in view.gates:
        c = _COLOURS.get(g.outcome, "white")
        table.add_row(
            g.name + (" (dry run)" if g.dry_run else ""),
            f"[{c}]{g.outcome}[/]",
            f"{g.samples:,}",
            f"{g.needed:,}",
            g.failures,
            g.inconclusives,
            g.reason,
        )
    parts: list[object] = [head]
    if view.gates:
        parts.append(table)
    if view.ab:
        parts.append(view.ab)
    parts.append(f"[dim]last {view.last_action}: {view.reason}[/]")
    return Group(*parts)  # type: ignore[arg-type]


Loader = Callable[[], tuple[RolloutStatus, RolloutPlan] | None]


def follow(
    load: Loader,
    out: Console,
    *,
    interval: float = 1.0,
    stop: threading.Event | None = None,
    heartbeat_s: float = 15.0,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> RolloutStatus | None:
    """Show the rollout ``load`` returns until it ends (or ``stop`` is set); its last status.

    ``load`` returns ``None`` while there is nothing to show yet (the rollout has not
    written its files). On a terminal the view is a live table; elsewhere a line is printed
    whenever the step, phase or last action changes, and every ``heartbeat_s`` seconds.
    """
    live = Live(console=out, refresh_per_second=4, transient=False) if out.is_terminal else None
    last: RolloutStatus | None = None
    printed_key: tuple[object, ...] | None = None
    printed_at = 0.0
    with live if live is not None else nullcontext():
        while True:
            loaded = load()
            stopping = stop is not None and stop.is_set()
            if loaded is not None:
                last, plan = loaded
                view = build_view(last, plan, clock())
                if live is not None:
                    live.update(render(view), refresh=True)
                else:
                    key = (view.step, view.phase, view.decisions, view.stale_s is not None)
                    beat = time.monotonic() - printed_at >= heartbeat_s
                    if key != printed_key or beat or last.terminal or stopping:
                        out.print(view.line(), soft_wrap=True, markup=False, highlight=False)
                        out.file.flush()  # a pipe or log file sees each line as it happens
                        printed_key, printed_at = key, time.monotonic()
                if last.terminal:
                    return last
            if stopping:
                return last
            if stop is not None:
                stop.wait(interval)
            else:
                time.sleep(interval)
