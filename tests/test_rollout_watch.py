"""The live rollout view and ``mlops rollout watch``, on status files the rollout machine wrote.

A rollout of the demo plan is driven tick by tick through the real state machine (the
synthetic world of test_rollout_machine: 200 requests/s, labels on 80 % of answers); each
tick's status is persisted the way the rollout flow persists it, and the watcher reads
those files, as it reads a rollout started by another process.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from mlops.rollout import machine as m
from mlops.rollout.plan import RolloutPlan, load_plan
from mlops.settings import Settings
from mlops_cli.main import app
from mlops_cli.rollout_view import build_view, follow, render
from tasks.rollout import save_plan, save_status
from tests.test_rollout_machine import ALIASES, C, Candidate, S, approve

REPO = Path(__file__).resolve().parent.parent
DEMO = load_plan(REPO / "configs/rollout/demo.yaml")
RUNNER = CliRunner()


def _statuses(plan: RolloutPlan, candidate: Candidate, rid: str = "r-watch") -> list[m.RolloutStatus]:
    """Every status the rollout flow would persist for this rollout, tick by tick, until it ends."""
    now = datetime.now(UTC)
    status = m.start(
        rid, plan, model_name="fraud", stable_version=S, candidate_version=C, aliases=ALIASES, now=now
    )
    out = [status]
    for _ in range(2000):
        now += timedelta(seconds=plan.tick_interval_s)
        d = m.decide(status, candidate(plan, status, now), plan, now, approve(status, now))
        status = d.status
        for effect in d.effects:
            status = m.mark_applied(status, effect.key, now)
        out.append(status)
        if status.terminal:
            return out
    raise AssertionError(f"the rollout did not end: {status.history[-1].reason}")


def _at(statuses: list[m.RolloutStatus], step: str) -> m.RolloutStatus:
    """The last status still measuring ``step`` (by its decision-log label)."""
    return [s for s in statuses if s.history and s.history[-1].step == step][-1]


def test_view_of_a_canary_weight_shows_gates_samples_needed_and_time_left() -> None:
    """Given a demo-plan rollout measuring its 5 % canary weight, the view names the step as
    3 of 6 and the weight as 2 of 4, lists every gate of the step (the implicit
    candidate_traffic one too) with samples collected against the plan's min_samples, and
    counts the time left from the step's duration and the later steps' durations."""
    statuses = _statuses(DEMO, Candidate())
    status = _at(statuses, "canary 5%")
    record = status.history[-1]
    view = build_view(status, DEMO, record.at)
    assert (view.step_number, view.step_count) == (3, 6)
    assert view.step == "canary 5% (weight 2/4)"
    assert view.candidate_pct == 5.0
    gates = {g.name: g for g in view.gates}
    assert list(gates) == [
        "latency_p95_ms_vs_stable_ratio",
        "latency_p99_ms_vs_stable_ratio",
        "error_rate_vs_stable_diff",
        "candidate_traffic",
    ]
    measured = {c.key: c for c in record.checks}
    for name, gate in gates.items():
        assert gate.samples == measured[name].samples and gate.outcome == measured[name].outcome.value
        assert gate.needed == 40  # the canary step's min_samples
    elapsed = (record.at - status.step_started_at).total_seconds()
    canary, ab, bg = DEMO.steps[2], DEMO.steps[3], DEMO.steps[5]
    assert view.step_left_s == pytest.approx(max(0.0, canary.duration_s - elapsed))
    later = 2 * canary.duration_s + ab.duration_s + max(bg.duration_s, bg.keep_warm_s)
    assert view.rollout_left_s == pytest.approx(view.step_left_s + later)
    text = " ".join(view.line().split())
    assert "[3/6] canary 5% (weight 2/4)" in text and "candidate_traffic" in text


def test_view_of_the_ab_step_shows_the_powered_sample_as_needed() -> None:
    """In the A/B step the primary test's row needs the sample its power calculation asks
    for (more than min_samples), and the view prints the interval so far."""
    statuses = _statuses(DEMO, Candidate(loss=0.015))
    status = _at(statuses, "ab")
    view = build_view(status, DEMO, status.history[-1].at)
    midway = next(
        s
        for s in statuses
        if s.history
        and s.history[-1].step == "ab"
        and s.history[-1].ab
        and 0 < s.history[-1].ab.n_candidate < 2000
    )
    primary = next(g for g in view.gates if g.name == "ab_log_loss")
    ab = status.history[-1].ab
    assert ab is not None and ab.n_required is not None
    assert primary.needed == max(DEMO.steps[3].primary.min_samples, ab.n_required)
    assert view.ab is not None and f"of {ab.n_required} per arm" in view.ab
    # midway, time left counts the samples still missing at the step's rate so far
    early = build_view(midway, DEMO, midway.history[-1].at)
    short = next(g for g in early.gates if g.name == "ab_log_loss")
    elapsed = (midway.history[-1].at - midway.step_started_at).total_seconds()
    assert 0 < short.samples < short.needed
    assert early.samples_eta_s is not None
    assert early.samples_eta_s >= (short.needed - short.samples) * elapsed / short.samples - 1e-6
    assert early.rollout_left_s >= early.samples_eta_s
    assert "more for the samples the gates need" in early.line()
    assert [g.name for g in view.gates][-2:] == ["sample_ratio", "ab_log_loss"]
    Console(width=160, file=open("/dev/null", "w")).print(render(view))  # renders without error


def test_follow_prints_each_change_and_returns_the_final_status() -> None:
    """Off a terminal, following a rollout prints one line whenever its step or decisions
    change and returns its last status once it has ended."""
    statuses = _statuses(DEMO, Candidate(loss=0.015))
    feed = iter(statuses)
    last: list[m.RolloutStatus] = []

    def load():
        s = next(feed, statuses[-1])
        last.append(s)
        return s, DEMO

    out = Console(width=400, record=True, file=open("/dev/null", "w"))
    final = follow(load, out, interval=0, heartbeat_s=3600)
    assert final is not None and final.phase is m.Phase.SUCCEEDED
    text = out.export_text()
    for step in (
        "[1/6] replay",
        "[2/6] shadow",
        "[3/6] canary 1% (weight 1/4)",
        "[4/6] ab",
        "[5/6] approval",
    ):
        assert step in text, text
    assert "[6/6] blue_green: succeeded" in text
    assert len(text.splitlines()) < len(statuses) / 2  # a line per change, not per tick


def _write_while_watching(
    settings: Settings, statuses: list[m.RolloutStatus], plan: RolloutPlan
) -> threading.Thread:
    """Persist ``statuses`` one after another, as a rollout in another process would."""

    def write() -> None:
        save_plan(settings, statuses[0].rollout_id, plan)
        for s in statuses:
            save_status(settings, s)
            time.sleep(0.03)

    save_plan(settings, statuses[0].rollout_id, plan)
    save_status(settings, statuses[0])
    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def test_watch_follows_a_rollout_written_by_another_process_until_it_succeeds(home: Settings) -> None:
    """`mlops rollout watch ID` on a rollout whose status file another writer updates tick by
    tick renders its steps as they happen and exits 0 once the rollout has succeeded."""
    statuses = _statuses(DEMO, Candidate(loss=0.015), rid="r-ok")
    writer = _write_while_watching(home, statuses, DEMO)
    result = RUNNER.invoke(app, ["rollout", "watch", "r-ok", "--interval", "0.05"])
    writer.join()
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert len({part.split("]")[0] for part in text.split("rollout r-ok [")[1:]}) >= 3, (
        text
    )  # steps as they went
    assert "[6/6] blue_green: succeeded" in text and "rollout r-ok: succeeded" in text, text


def test_watch_exits_3_when_the_rollout_rolls_back(home: Settings) -> None:
    """A watched rollout whose candidate is slower than the canary allows ends rolled back:
    the watcher shows why and exits 3."""
    statuses = _statuses(DEMO, Candidate(p99_factor=4.0), rid="r-slow")
    assert statuses[-1].phase is m.Phase.ROLLED_BACK
    writer = _write_while_watching(home, statuses, DEMO)
    result = RUNNER.invoke(app, ["rollout", "watch", "r-slow", "--interval", "0.05"])
    writer.join()
    assert result.exit_code == 3, result.output
    text = " ".join(result.output.split())
    assert "rollout r-slow: rolled_back" in text and "latency_p" in text, text


def test_watch_of_an_unknown_rollout_is_one_line_and_exit_4(home: Settings) -> None:
    """`mlops rollout watch` of an id with no status file says so in one line, exit code 4."""
    result = RUNNER.invoke(app, ["rollout", "watch", "nope"])
    assert result.exit_code == 4
    assert "no rollout 'nope'" in result.output and "Traceback" not in result.output
