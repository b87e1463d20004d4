"""Edge variants as data: measurements, the accuracy gate, applicability and selection.

Every variant is measured the same way (file size, single-row p50/p99 latency, the budget's
metric and its drop against the float teacher, probability drift against its parent) and
then gated. The gate is a ``GateResult`` of counted checks with reasons carrying numbers,
e.g. ``"roc_auc drop 0.0071 > max 0.0050"``; a variant is published only when the gate
passes. A technique that cannot help a model type is *skipped*, with a reason that says
why for that model type, rather than attempted and reported as a failure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from mlops.edge.budget import EdgeLimits
from mlops.gates import CheckResult, GateResult, Outcome

SKIPPED = "SKIPPED"

# Why a technique does not apply, per model type (what was measured on this platform).
SKIP_REASONS: dict[tuple[str, str], str] = {
    ("quantize", "tree"): (
        "tree ensemble (TreeEnsembleClassifier): thresholds and leaf values, no weight matrices; "
        "ONNX Runtime's INT8 quantizer leaves it unchanged (measured: no effect on the gradient-boosted model). "
        "Distil it into a neural student and quantize that"
    ),
    ("quantize", "linear"): (
        "linear model (LinearClassifier, an ai.onnx.ml operator): not an operator ONNX Runtime's quantizer handles "
        "(measured: it raised an error on logistic regression), and its weights are a few hundred bytes anyway"
    ),
    ("quantize", "other"): "the graph has no dense layer (MatMul/Gemm with constant weights) to quantize",
    (
        "prune",
        "tree",
    ): "tree ensemble: structured pruning removes hidden units of a neural network, and trees have none",
    ("prune", "linear"): "linear model: no hidden units to remove",
    ("prune", "other"): "no hidden units to remove",
    ("prune", "neural"): (
        "structured pruning needs the network's weights as this flow trained them; "
        "prune a 'distill' or 'prune' variant, not an imported ONNX network"
    ),
}


def skip_reason(technique: str, family: str, trainable: bool = False) -> str | None:
    """Why ``technique`` does not apply to a source of model type ``family`` (None: it applies)."""
    if technique == "quantize":
        return (
            None
            if family == "neural"
            else SKIP_REASONS.get(("quantize", family), SKIP_REASONS[("quantize", "other")])
        )
    if technique == "prune":
        if family == "neural" and trainable:
            return None
        return SKIP_REASONS.get(("prune", family), SKIP_REASONS[("prune", "other")])
    return None


@dataclass(frozen=True)
class Measurement:
    """What one variant costs and how it scores, on the same held-out rows as every other."""

    rows: int
    size_bytes: int
    latency_p50_ms: float  # CPU time of one single-row call (see compress.single_row_latency)
    latency_p99_ms: float
    batch_rows_per_s: float
    metric: str
    value: float
    teacher_value: float
    max_abs_dp: float  # against the parent
    mean_abs_dp: float
    max_abs_dp_teacher: float
    mean_abs_dp_teacher: float
    parity_max_abs_diff: float | None = None  # ONNX against scikit-learn, for trained variants
    weight_shapes: tuple[tuple[int, ...], ...] = ()
    wall_p50_ms: float = math.nan  # elapsed time, including waits for a core on a shared host
    wall_p99_ms: float = math.nan

    @property
    def drop(self) -> float:
        """How much worse than the float teacher (positive = worse)."""
        return self.teacher_value - self.value


@dataclass(frozen=True)
class VariantResult:
    """One variant of the budget: built, skipped (with why) or failed (with the error)."""

    name: str
    kind: str
    technique: str
    source: str | None
    family: str
    preserves_function: bool
    status: str  # built | skipped | error
    reason: str = ""
    measurement: Measurement | None = None
    gate: GateResult | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def outcome(self) -> str:
        """The gate's outcome; ``ERROR`` if the variant could not be built, ``SKIPPED`` if not tried."""
        if self.status == "skipped":
            return SKIPPED
        if self.status == "error" or self.gate is None:
            return Outcome.ERROR.value
        return self.gate.outcome.value

    @property
    def passed(self) -> bool:
        """Whether the variant was built and passed its gate."""
        return self.gate is not None and self.gate.passed

    @property
    def verdict(self) -> str:
        """One line: why it passed, failed, errored or was skipped."""
        if self.status != "built" or self.gate is None:
            return self.reason
        return self.gate.reason


def _check(name: str, value: float, limit: float, label: str, fmt: str) -> CheckResult:
    if not math.isfinite(value):
        return CheckResult(name, Outcome.ERROR, f"{label} is {value}", value)
    verdict = "<=" if value <= limit else ">"
    outcome = Outcome.PASS if value <= limit else Outcome.FAIL
    return CheckResult(name, outcome, f"{label} {value:{fmt}} {verdict} max {limit:{fmt}}", value)


def gate_variant(m: Measurement, limits: EdgeLimits, preserves_function: bool) -> GateResult:
    """The budget's checks of one measured variant; PASS only if every check passes.

    Probability drift is gated for techniques that claim to keep the parent's function
    (graph optimisation, quantization): a good metric can hide a row whose probability
    moved a lot. A retrained variant is gated on the metric drop alone (drift is reported).
    """
    checks = [
        _check("size_bytes", float(m.size_bytes), float(limits.max_size_bytes), "size (B)", ",.0f"),
        _check(
            "latency_p99_ms", m.latency_p99_ms, limits.max_latency_p99_ms, "single-row p99 CPU (ms)", ".3f"
        ),
        _check("metric_drop", m.drop, limits.max_metric_drop, f"{m.metric} drop", ".4f"),
    ]
    if preserves_function:
        checks.append(_check("max_abs_dp", m.max_abs_dp, limits.max_abs_dp, "max |dp|", ".4f"))
        checks.append(_check("mean_abs_dp", m.mean_abs_dp, limits.max_mean_dp, "mean |dp|", ".5f"))
    if m.parity_max_abs_diff is not None:
        checks.append(
            _check(
                "parity",
                m.parity_max_abs_diff,
                limits.parity_tolerance,
                "ONNX vs scikit-learn max |dp|",
                ".1e",
            )
        )
    return GateResult(tuple(checks))


_ORDER = {
    "size": lambda m: (m.size_bytes, m.latency_p50_ms, m.drop),
    "latency": lambda m: (m.latency_p50_ms, m.size_bytes, m.drop),
    "metric": lambda m: (m.drop, m.size_bytes, m.latency_p50_ms),
}


def select_variant(results: Sequence[VariantResult], select_by: str) -> VariantResult | None:
    """The best variant that passed its gate (smallest, fastest or most accurate); None if none did."""
    passing = [r for r in results if r.passed and r.measurement is not None]
    if not passing:
        return None
    key = _ORDER[select_by]
    return min(passing, key=lambda r: key(r.measurement))
