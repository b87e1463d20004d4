"""The rollout report: one self-contained HTML page per rollout, built from its status.

Everything comes from ``RolloutStatus.history`` (each decision keeps the numbers it was
made on), so a report can be rebuilt at any time, for a running or a finished rollout:

- traffic: the candidate's share of live answers (and the shadow mirror share) over time;
- latency p50/p95/p99 per variant;
- each check's value against its threshold range, coloured by outcome;
- the A/B primary effect with its always-valid confidence interval;
- the decision log.

Figures are PNG bytes (``report_figures``) drawn with matplotlib's object API on the Agg
canvas, so importing this module selects no backend and opens no window; ``render_report``
inlines them as base64 images.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from datetime import datetime

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mlops.gates import Outcome
from mlops.rollout.machine import Record, RolloutStatus
from mlops.rollout.plan import RolloutPlan

OUTCOME_COLOURS = {
    Outcome.PASS: "#2e7d32",
    Outcome.FAIL: "#c62828",
    Outcome.INCONCLUSIVE: "#9e9e9e",
    Outcome.ERROR: "#6a1b9a",
}
VARIANT_COLOURS = {"stable": "#1565c0", "candidate": "#ef6c00"}
ACTION_COLOURS = {"rollback": "#c62828", "abort": "#6a1b9a", "pause": "#f9a825", "promote": "#2e7d32"}


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _minutes(history: Sequence[Record], start: datetime) -> list[float]:
    return [(r.at - start).total_seconds() / 60.0 for r in history]


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def _mark_steps(ax, history: Sequence[Record], start: datetime) -> None:
    """Vertical lines where the rollout changed step, and the terminal action."""
    last = None
    for r in history:
        x = (r.at - start).total_seconds() / 60.0
        if r.step != last:
            ax.axvline(x, color="#bdbdbd", lw=0.8, ls=":")
            ax.text(
                x,
                1.0,
                f" {r.step}",
                transform=ax.get_xaxis_transform(),
                rotation=90,
                va="top",
                ha="left",
                fontsize=7,
                color="#616161",
            )
            last = r.step
        if r.action.value in ACTION_COLOURS:
            ax.axvline(x, color=ACTION_COLOURS[r.action.value], lw=1.2)


def traffic_figure(status: RolloutStatus) -> bytes:
    """The candidate's share of live answers, and the shadow mirror share, over time."""
    h, start = status.history, status.created_at
    x = _minutes(h, start)
    fig = Figure(figsize=(9, 2.8))
    ax = fig.add_subplot()
    ax.step(
        x,
        [r.route.candidate_pct for r in h],
        where="post",
        color=VARIANT_COLOURS["candidate"],
        label="candidate share of live answers (%)",
    )
    ax.step(
        x,
        [r.route.mirror_pct for r in h],
        where="post",
        color="#7e57c2",
        ls="--",
        label="mirrored to candidate (%)",
    )
    _mark_steps(ax, h, start)
    ax.set(xlabel="minutes since start", ylabel="%", ylim=(-3, 105), title="Traffic")
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def latency_figure(status: RolloutStatus) -> bytes:
    """p50/p95/p99 latency of each variant over time (the analysis window of each tick)."""
    h, start = status.history, status.created_at
    x = _minutes(h, start)
    fig = Figure(figsize=(9, 3.2))
    ax = fig.add_subplot()
    for variant, colour in VARIANT_COLOURS.items():
        for q, style in (("latency_p50_ms", ":"), ("latency_p95_ms", "--"), ("latency_p99_ms", "-")):
            y = [_nan(getattr(r.variants[variant], q)) if variant in r.variants else math.nan for r in h]
            if any(math.isfinite(v) for v in y):
                ax.plot(x, y, ls=style, color=colour, marker=".", ms=3, label=f"{variant} {q[8:11]}")
    _mark_steps(ax, h, start)
    ax.set(xlabel="minutes since start", ylabel="ms", title="Latency per variant")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize=7, ncol=2)
    else:  # ended before any variant served traffic (e.g. stopped by the replay)
        ax.text(0.5, 0.5, "no live traffic measured", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)


def check_figure(status: RolloutStatus, key: str) -> bytes:
    """One check's compared value over time against its min/max, points coloured by outcome."""
    h, start = status.history, status.created_at
    pts = [((r.at - start).total_seconds() / 60.0, c) for r in h for c in r.checks if c.key == key]
    fig = Figure(figsize=(4.4, 2.6))
    ax = fig.add_subplot()
    xs = [x for x, _ in pts]
    for bound, colour in (("min", "#1b5e20"), ("max", "#b71c1c")):
        ys = [_nan(getattr(c, bound)) for _, c in pts]
        if any(math.isfinite(y) for y in ys):
            ax.step(xs, ys, where="post", color=colour, ls="--", lw=1, label=bound)
    for outcome, colour in OUTCOME_COLOURS.items():
        sel = [(x, c.value) for x, c in pts if c.outcome is outcome and c.value is not None]
        if sel:
            ax.scatter(
                [x for x, _ in sel],
                [y for _, y in sel],
                s=10,
                color=colour,
                label=outcome.value.lower(),
                zorder=3,
            )
    dry = " (dry run)" if pts and pts[-1][1].dry_run else ""
    ax.set_title(f"{key}{dry}", fontsize=9)
    ax.set_xlabel("minutes since start", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="best")
    return _png(fig)


def ab_figure(status: RolloutStatus, mde: float | None = None) -> bytes | None:
    """The A/B primary improvement (positive = candidate better) with its always-valid CI."""
    h, start = status.history, status.created_at
    pts = [
        ((r.at - start).total_seconds() / 60.0, r.ab)
        for r in h
        if r.ab is not None and r.ab.improvement is not None
    ]
    if not pts:
        return None
    x = [p for p, _ in pts]
    fig = Figure(figsize=(9, 3.0))
    ax = fig.add_subplot()
    lo = [_nan(a.ci_low) for _, a in pts]
    hi = [_nan(a.ci_high) for _, a in pts]
    ax.fill_between(
        x, lo, hi, color=VARIANT_COLOURS["candidate"], alpha=0.2, step="post", label="always-valid CI"
    )
    ax.plot(
        x,
        [a.improvement for _, a in pts],
        color=VARIANT_COLOURS["candidate"],
        marker=".",
        ms=3,
        label=f"improvement in {pts[0][1].metric}",
    )
    ax.axhline(0.0, color="black", lw=0.8)
    if mde is not None:
        ax.axhline(mde, color="#2e7d32", ls="--", lw=0.8, label="+mde")
        ax.axhline(-mde, color="#c62828", ls="--", lw=0.8, label="-mde")
    powered = next(
        (xx for xx, a in pts if a.n_required and min(a.n_stable, a.n_candidate) >= a.n_required), None
    )
    if powered is not None:
        ax.axvline(powered, color="#616161", ls=":", lw=1, label="powered sample reached")
    ax.set(xlabel="minutes since start", title="A/B primary metric: candidate improvement over stable")
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def bandit_figure(status: RolloutStatus) -> bytes | None:
    """A bandit step's P(candidate best) and the candidate's allocated weight, per tick."""
    start = status.created_at
    pts = [
        ((r.at - start).total_seconds() / 60.0, r.bandit)
        for r in status.history
        if r.bandit is not None and len(r.bandit.prob_best) == 2
    ]
    if not pts:
        return None
    x = [p for p, _ in pts]
    fig = Figure(figsize=(9, 3.0))
    ax = fig.add_subplot()
    colour = VARIANT_COLOURS["candidate"]
    ax.plot(x, [b.prob_best[1] for _, b in pts], color=colour, marker=".", ms=3, label="P(candidate best)")
    ax.step(
        x, [b.weight_pct / 100.0 for _, b in pts], where="post", color="#616161", label="candidate weight"
    )
    ax.set_ylim(-0.02, 1.02)
    ax.set(xlabel="minutes since start", title="Bandit: P(candidate best) and candidate traffic share")
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def report_figures(status: RolloutStatus, plan: RolloutPlan | None = None) -> dict[str, bytes]:
    """Every figure of the report as PNG bytes, by file name."""
    out = {"traffic.png": traffic_figure(status), "latency.png": latency_figure(status)}
    keys: list[str] = []
    for r in status.history:
        for c in r.checks:
            if c.key not in keys:
                keys.append(c.key)
    for key in keys:
        out[f"check-{key}.png"] = check_figure(status, key)
    mde = None
    if plan is not None:
        mde = next((s.primary.mde for s in plan.steps if s.kind == "ab"), None)  # type: ignore[union-attr]
    ab = ab_figure(status, mde)
    if ab is not None:
        out["ab.png"] = ab
    bandit = bandit_figure(status)
    if bandit is not None:
        out["bandit.png"] = bandit
    return out


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#212121;max-width:1100px}
h1{font-size:1.4em} h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #e0e0e0}
table{border-collapse:collapse;font-size:.82em;width:100%} td,th{border:1px solid #e0e0e0;padding:3px 6px;vertical-align:top;text-align:left}
th{background:#fafafa} .phase{font-weight:600} .grid{display:flex;flex-wrap:wrap;gap:6px}
.action-rollback,.action-abort{background:#ffebee} .action-promote{background:#e8f5e9} .action-pause{background:#fff8e1}
.action-advance{background:#f1f8e9} .action-await_approval{background:#e3f2fd} code{font-size:.9em}
"""


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def render_report(
    status: RolloutStatus,
    plan: RolloutPlan | None = None,
    *,
    holds: bool = False,
    figures: dict[str, bytes] | None = None,
) -> str:
    """The rollout's HTML report (self-contained: figures are inline PNGs).

    The decision log lists every decision except plain holds, unless ``holds``; the
    figures always use every tick. ``figures`` (from ``report_figures``) saves drawing them
    again when the caller also stores the PNGs.
    """
    e = html.escape
    figs = figures if figures is not None else report_figures(status, plan)
    s = status
    rows = []
    for r in s.history:
        if r.action.value == "hold" and not holds:
            continue
        rows.append(
            f'<tr class="action-{r.action.value}"><td>{r.seq}</td><td>{r.at:%Y-%m-%d %H:%M:%S}</td>'
            f"<td>{e(r.step)}</td><td>{e(r.action.value)}</td><td>{e(r.reason)}</td>"
            f"<td>{'<br>'.join(f'<code>{e(k)}</code>' for k in r.effects)}</td></tr>"
        )
    applied = "".join(
        f"<tr><td><code>{e(a.key)}</code></td><td>{a.at:%Y-%m-%d %H:%M:%S}</td></tr>" for a in s.applied
    )
    checks = "".join(_img(v, k) for k, v in figs.items() if k.startswith("check-"))
    ab = _img(figs["ab.png"], "A/B effect") if "ab.png" in figs else "<p>No A/B measurements.</p>"
    if "bandit.png" in figs:
        ab += _img(figs["bandit.png"], "bandit allocation")
    devices = ""
    st = s.device.ota_status() if s.device is not None else None
    if st is not None:
        stage_rows = "".join(
            f"<tr><td>{h.percent:g}%</td><td>{e(h.action)}</td><td>{e(h.outcome)}</td><td>{e(h.reason)}</td></tr>"
            for h in st.history
        )
        devices = (
            f"<h2>Devices</h2><p>release v{st.version} (model v{s.candidate_version}), last good before it: "
            f"{'v' + str(s.device.last_good) if s.device.last_good else 'none'}; device rollout "
            f"{e(st.phase.value)}</p><table><tr><th>cohort</th><th>action</th><th>gate</th><th>reason</th></tr>"
            f"{stage_rows}</table>"
        )
    plan_line = f"{e(s.plan_name)} (<code>{e(s.plan_digest)}</code>)"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Rollout {e(s.rollout_id)}</title><style>{_CSS}</style></head>
<body>
<h1>Rollout {e(s.rollout_id)}: {e(s.model_name)} v{s.candidate_version} against v{s.stable_version}</h1>
<table>
<tr><th>phase</th><td class="phase">{e(s.phase.value)}</td><th>plan</th><td>{plan_line}</td></tr>
<tr><th>started</th><td>{s.created_at:%Y-%m-%d %H:%M:%S %Z}</td><th>updated</th><td>{s.updated_at:%Y-%m-%d %H:%M:%S %Z}</td></tr>
<tr><th>serving</th><td colspan="3">{e(s.route.describe())}</td></tr>
<tr><th>outcome</th><td colspan="3">{e(s.final_reason or "in progress")}</td></tr>
</table>
<h2>Traffic</h2>{_img(figs["traffic.png"], "traffic")}
<h2>Latency</h2>{_img(figs["latency.png"], "latency")}
<h2>Gates</h2><div class="grid">{checks}</div>
<h2>Experiment (A/B, bandit)</h2>{ab}
{devices}
<h2>Decision log</h2>
<table><tr><th>#</th><th>at</th><th>step</th><th>action</th><th>reason</th><th>effects</th></tr>{"".join(rows)}</table>
<h2>Applied effects</h2>
<table><tr><th>key</th><th>applied at</th></tr>{applied}</table>
</body></html>
"""
