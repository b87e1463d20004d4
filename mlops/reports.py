"""Plots and small reports: figures are data (PNG bytes), sinks decide where they go."""

from __future__ import annotations

import io
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def evaluation_plots(y: np.ndarray, scores: Mapping[str, np.ndarray]) -> dict[str, bytes]:
    """ROC, precision-recall and calibration curves of each candidate, as PNG files."""
    out: dict[str, bytes] = {}
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for label, p in scores.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=label)
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax.legend(loc="lower right")
    out["roc.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(5, 4.5))
    for label, p in scores.items():
        prec, rec, _ = precision_recall_curve(y, p)
        ax.plot(rec, prec, label=label)
    ax.axhline(float(np.mean(y)), ls=":", c="grey", label="base rate")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall")
    ax.legend(loc="upper right")
    out["precision_recall.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(5, 4.5))
    for label, p in scores.items():
        order = np.argsort(p)
        bins = [b for b in np.array_split(order, 15) if len(b)]
        ax.plot([p[b].mean() for b in bins], [y[b].mean() for b in bins], marker="o", ms=3, label=label)
    top = max(float(max(p.max() for p in scores.values())), 0.05)
    ax.plot([0, top], [0, top], ls=":", c="grey")
    ax.set(xlabel="mean predicted probability", ylabel="observed fraud rate", title="Calibration")
    ax.legend(loc="upper left")
    out["calibration.png"] = _png(fig)
    return out


def metrics_markdown(title: str, rows: Mapping[str, Mapping[str, float]], chosen: str | None = None) -> str:
    """A Markdown table of metrics per candidate (Prefect artifact, CLI summary)."""
    names = sorted({k for r in rows.values() for k in r})
    lines = [f"### {title}", "", "| candidate | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, metrics in rows.items():
        mark = " (selected)" if label == chosen else ""
        lines.append(
            f"| {label}{mark} | " + " | ".join(f"{metrics.get(n, float('nan')):.4g}" for n in names) + " |"
        )
    return "\n".join(lines)
