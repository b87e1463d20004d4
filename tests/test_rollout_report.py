"""The rollout report (mlops.rollout.report): one self-contained HTML page from a status."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta

import pytest

from mlops.rollout import machine as m
from mlops.rollout.abtest import Arm, Arms
from mlops.rollout.observe import Observations, VariantStats
from mlops.rollout.plan import ABStep, BlueGreenStep, CanaryStep, MetricCheck, RolloutPlan, SequentialTest
from mlops.rollout.report import render_report, report_figures

T0 = datetime(2026, 3, 1, tzinfo=UTC)
PNG = b"\x89PNG\r\n\x1a\n"
PLAN = RolloutPlan(
    name="report",
    tick_interval_s=10,
    steps=(
        CanaryStep(
            weights=(10, 50),
            duration_s=20,
            min_samples=10,
            checks=(
                MetricCheck(metric="latency_p99_ms", relative_to_stable="ratio", max=1.5, min_samples=10),
                MetricCheck(metric="score_psi", max=0.2, min_samples=10, dry_run=True),
            ),
        ),
        ABStep(
            duration_s=20,
            min_samples=10,
            primary=SequentialTest(
                metric="log_loss", mde=0.01, sigma=0.1, min_samples=100, inconclusive_limit=10
            ),
            checks=(MetricCheck(metric="error_rate", max=0.01, min_samples=10),),
        ),
        BlueGreenStep(
            duration_s=20,
            min_samples=10,
            checks=(MetricCheck(metric="error_rate", max=0.01, min_samples=10),),
        ),
    ),
)


def _feed(status: m.RolloutStatus, now: datetime) -> Observations | None:
    """A candidate 10 % slower and clearly better on log loss; 100 requests/s."""
    if status.window_start is None:
        return None
    n = int(100 * (now - status.window_start).total_seconds())
    share = status.route.candidate_pct / 100
    nc, ns = int(n * share), int(n * (1 - share))
    stable = VariantStats(version=3, requests=ns, latency_p50_ms=5, latency_p95_ms=9, latency_p99_ms=11)
    cand = VariantStats(
        version=4, requests=nc, latency_p50_ms=5.5, latency_p95_ms=9.9, latency_p99_ms=12.1, score_psi=0.3
    )
    ab = None
    if status.route.mode == "ab":
        ab = Arms("log_loss", Arm(ns, 0.03, 0.01), Arm(nc, 0.015, 0.005), ns // 10, nc // 10)
    return Observations(since=status.window_start, until=now, stable=stable, candidate=cand, ab=ab)


@pytest.fixture(scope="module")
def status() -> m.RolloutStatus:
    st = m.start(
        "rep-1",
        PLAN,
        model_name="fraud <detector>",
        stable_version=3,
        candidate_version=4,
        aliases={"champion": 3},
        now=T0,
    )
    now = T0
    for _ in range(100):
        now += timedelta(seconds=10)
        d = m.decide(st, _feed(st, now), PLAN, now)
        st = d.status
        for e in d.effects:
            st = m.mark_applied(st, e.key, now)
        if st.terminal:
            break
    assert st.phase is m.Phase.SUCCEEDED, st.history[-1].reason
    return st


@pytest.fixture(scope="module")
def figures(status: m.RolloutStatus) -> dict[str, bytes]:
    return report_figures(status, PLAN)


@pytest.fixture(scope="module")
def page(status: m.RolloutStatus, figures: dict[str, bytes]) -> str:
    return render_report(status, PLAN, figures=figures)


def test_report_is_one_self_contained_page(page: str, figures: dict[str, bytes]) -> None:
    """The page loads nothing from elsewhere: no scripts, no remote URLs, and every image
    is an inline PNG."""
    assert page.startswith("<!doctype html>") and "<script" not in page
    assert not re.search(r"(src|href)=\"(?!data:)", page)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(figures) >= 6
    assert all(base64.b64decode(i).startswith(PNG) for i in images)


def test_report_shows_the_decision_log_with_its_numbers(
    status: m.RolloutStatus, page: str, figures: dict[str, bytes]
) -> None:
    """Every decision that changed something is in the log with its reason (HTML-escaped),
    plain holds only on request; the header names the versions and the outcome."""
    assert "fraud &lt;detector&gt; v4 against v3" in page
    changes = [h for h in status.history if h.action is not m.Action.HOLD]
    holds = [h for h in status.history if h.action is m.Action.HOLD]
    for h in changes:
        assert f"<td>{h.seq}</td>" in page
    assert f"<td>{holds[0].seq}</td>" not in page
    assert f"<td>{holds[0].seq}</td>" in render_report(status, PLAN, holds=True, figures=figures)
    assert "always-valid 95% CI" in page and "candidate better" in page
    assert "rollout succeeded: v4 serves all traffic, v3 released" in page
    assert "rep-1/promote/aliases" in page  # the applied-effects ledger


def test_figures_cover_traffic_latency_every_check_and_the_ab_effect(
    status: m.RolloutStatus, figures: dict[str, bytes]
) -> None:
    """One figure for traffic, one for latency, one per check (dry runs included) and one
    for the A/B effect; a rollout with no A/B measurement has no A/B figure."""
    figs = figures
    assert {
        "traffic.png",
        "latency.png",
        "ab.png",
        "check-latency_p99_ms_vs_stable_ratio.png",
        "check-score_psi.png",
        "check-error_rate.png",
        "check-candidate_traffic.png",
        "check-sample_ratio.png",
        "check-ab_log_loss.png",
    } <= set(figs)
    assert all(v.startswith(PNG) for v in figs.values())
    early = status.model_copy(update={"history": status.history[:3]})
    early_figs = report_figures(early)
    assert "ab.png" not in early_figs
    assert "No A/B measurements." in render_report(early, figures=early_figs)


def test_a_rollout_stopped_before_any_traffic_still_draws_every_figure() -> None:
    """A rollout aborted at its first tick (no variant measured) gets its traffic and latency
    figures without a plotting warning: the latency panel says nothing was measured."""
    import warnings

    st = m.start(
        "rep-2",
        PLAN,
        model_name="fraud",
        stable_version=3,
        candidate_version=4,
        aliases={"champion": 3},
        now=T0,
    )
    st = m.decide(st, None, PLAN, T0 + timedelta(seconds=1), m.Signals(command="abort")).status
    assert st.terminal and not any(r.variants for r in st.history)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figs = report_figures(st, PLAN)
    assert figs["latency.png"].startswith(PNG) and figs["traffic.png"].startswith(PNG)
