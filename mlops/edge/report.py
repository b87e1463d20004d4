"""The export report: one table and one chart of every variant, and its JSON form.

Report data is built here; sinks (MLflow, the Prefect run, files under MLOPS_HOME) decide
where it goes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from mlops.edge.budget import EdgeBudget
from mlops.edge.variants import VariantResult


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


_MEASURED = (
    "size_bytes",
    "latency_p50_ms",
    "latency_p99_ms",
    "wall_p50_ms",
    "wall_p99_ms",
    "batch_rows_per_s",
    "metric",
    "value",
    "drop",
    "max_abs_dp",
    "mean_abs_dp",
    "max_abs_dp_teacher",
)


def variant_rows(results: Sequence[VariantResult]) -> list[dict[str, Any]]:
    """One flat record per variant (table, JSON, MLflow metrics)."""
    rows = []
    for r in results:
        m = r.measurement
        rows.append(
            {
                "variant": r.name,
                "technique": r.technique,
                "source": r.source,
                "family": r.family,
                "outcome": r.outcome,
                **{k: getattr(m, k) if m else None for k in _MEASURED},
                "weight_shapes": [list(s) for s in m.weight_shapes] if m else [],
                "verdict": r.verdict,
                "notes": list(r.notes),
            }
        )
    return rows


def markdown(
    title: str, results: Sequence[VariantResult], chosen: str | None, budget: EdgeBudget, teacher_bytes: int
) -> str:
    """The variants table with every figure and each verdict's reason (Prefect artifact, MLflow, CLI)."""
    lim = budget.limits
    lines = [
        f"### {title}",
        "",
        f"Budget **{budget.name}**: size <= {lim.max_size_bytes:,} B, single-row p99 <= {lim.max_latency_p99_ms:g} ms (CPU), "
        f"{lim.metric} drop <= {lim.max_metric_drop:g} vs the float teacher ({teacher_bytes:,} B), "
        f"max |dp| <= {lim.max_abs_dp:g} and mean |dp| <= {lim.max_mean_dp:g} vs the parent for quantization.",
        "",
        "| variant | outcome | size (B) | x teacher | p50 ms | p99 ms | "
        + lim.metric
        + " | drop | max abs dp | mean abs dp | weights |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in results:
        m = r.measurement
        mark = " **(selected)**" if r.name == chosen else ""
        if m is None:
            lines.append(f"| {r.name}{mark} | {r.outcome} | - | - | - | - | - | - | - | - | - |")
            continue
        shapes = ", ".join("x".join(map(str, s)) for s in m.weight_shapes) or "-"
        lines.append(
            f"| {r.name}{mark} | {r.outcome} | {m.size_bytes:,} | {teacher_bytes / m.size_bytes:.1f} | "
            f"{m.latency_p50_ms:.3f} | {m.latency_p99_ms:.3f} | {m.value:.4f} | {m.drop:+.4f} | "
            f"{m.max_abs_dp:.4f} | {m.mean_abs_dp:.5f} | {shapes} |"
        )
    lines += ["", "**Why** (each variant's technique, and what decided its outcome):", ""]
    for r in results:
        lines.append(f"- `{r.name}` ({r.technique}): {r.outcome}: {r.verdict}")
        lines += [f"  - {n}" for n in r.notes]
    lines.append("")
    lines.append(
        f"Selected by {budget.select_by}: **{chosen}**"
        if chosen
        else "No variant passed: nothing is published."
    )
    return "\n".join(lines)


def chart(results: Sequence[VariantResult], budget: EdgeBudget) -> bytes:
    """Size, single-row latency and metric drop of every built variant, budget lines dashed (PNG)."""
    built = [r for r in results if r.measurement is not None]
    names = [r.name for r in built]
    colors = ["tab:green" if r.passed else "tab:red" for r in built]
    fig, axes = plt.subplots(1, 3, figsize=(15, max(3.0, 0.42 * len(built) + 1.2)), sharey=True)
    y = range(len(built))
    sizes = [r.measurement.size_bytes / 1024 for r in built]  # type: ignore[union-attr]
    axes[0].barh(y, sizes, color=colors)
    axes[0].axvline(budget.limits.max_size_bytes / 1024, ls="--", c="grey")
    axes[0].set(xlabel="size (KiB)", title="model file")
    p50 = [r.measurement.latency_p50_ms for r in built]  # type: ignore[union-attr]
    p99 = [r.measurement.latency_p99_ms for r in built]  # type: ignore[union-attr]
    axes[1].barh(y, p99, color="lightgrey")
    axes[1].barh(y, p50, color=colors)
    axes[1].axvline(budget.limits.max_latency_p99_ms, ls="--", c="grey")
    axes[1].set(xlabel="single-row latency, CPU ms", title="latency (p50, p99 in grey)")
    axes[0].legend(
        handles=[
            Patch(color="tab:green", label="passed"),
            Patch(color="tab:red", label="failed"),
            Line2D([], [], ls="--", c="grey", label="budget"),
        ],
        loc="lower right",
    )
    drops = [r.measurement.drop for r in built]  # type: ignore[union-attr]
    axes[2].barh(y, drops, color=colors)
    axes[2].axvline(budget.limits.max_metric_drop, ls="--", c="grey")
    axes[2].axvline(0, c="black", lw=0.5)
    axes[2].set(xlabel=f"{budget.limits.metric} drop vs float teacher", title="accuracy")
    axes[0].set_yticks(list(y), names)
    axes[0].invert_yaxis()
    fig.suptitle(f"edge variants for {budget.name} (green: passed its gate)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def budget_dict(budget: EdgeBudget) -> dict[str, Any]:
    """The budget as JSON-ready data, for the export report."""
    return budget.model_dump(mode="json")


def gate_dict(result: VariantResult) -> dict[str, Any] | None:
    """A variant's gate outcome and checks as JSON-ready data; None when it was not gated."""
    if result.gate is None:
        return None
    return {
        "outcome": result.gate.outcome.value,
        "checks": [asdict(c) | {"outcome": c.outcome.value} for c in result.gate.checks],
    }
