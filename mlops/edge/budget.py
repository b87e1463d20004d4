"""Device budgets: what an edge variant must satisfy, and which variants to build.

A budget is configuration (``configs/edge/*.yaml``) validated once into frozen strict
models: an unknown field, a wrong type or an inconsistent variant list is a ``ConfigError``
naming the file and the field. The embedded defaults are the ``pos-terminal`` budget;
``configs/edge/pos-terminal.yaml`` spells them out.

Variants are a discriminated union on ``kind``, built in the order listed; a variant
names the earlier variant it derives from in ``source``:

``baseline``  the champion's ONNX model (the float teacher) after graph optimisation.
``distill``   a small neural student trained on the teacher's soft targets (with a
              temperature) plus the hard labels, sized for the budget unless ``hidden``
              is given.
``prune``     structured pruning of a neural variant: whole hidden units removed, the
              weight matrices rebuilt smaller, then fine-tuned from the pruned weights.
``quantize``  INT8 post-training quantization with ONNX Runtime: ``dynamic``, or
              ``static`` with a calibration method over a sample of training rows;
              per-channel weights where the operator allows; nodes that lose accuracy
              kept in float (``exclude_nodes``, or up to ``auto_exclude`` found by a
              sensitivity search).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from mlops.settings import StrictModel, read_yaml, validate_model

Metric = Literal["roc_auc", "pr_auc"]


class EdgeLimits(StrictModel):
    """The accuracy gate and the device's resources: a variant over any limit is never published.

    ``max_metric_drop`` is measured against the float teacher on held-out rows.
    ``max_abs_dp``/``max_mean_dp`` bound how far any probability moves (and how far they
    move on average) against the variant's parent, for techniques that claim to keep the
    parent's function (graph optimisation, quantization); a retrained variant (distilled,
    pruned and fine-tuned) is a new function and is held to the metric drop instead.
    """

    max_size_bytes: int = Field(16_384, ge=1)
    max_latency_p99_ms: float = Field(5.0, gt=0)
    metric: Metric = "roc_auc"
    max_metric_drop: float = Field(0.005, ge=0)
    max_abs_dp: float = Field(0.05, gt=0, le=1)
    max_mean_dp: float = Field(0.002, gt=0, le=1)
    parity_tolerance: float = Field(1e-4, gt=0)


class BaselineSpec(StrictModel):
    """The teacher's ONNX model, optimised by ONNX Runtime and compacted (names, doc strings)."""

    kind: Literal["baseline"] = "baseline"
    name: str = "float"
    optimization: Literal["basic", "extended"] = "basic"


class DistillSpec(StrictModel):
    """Knowledge distillation into a one- or more-layer ReLU network (an MLPClassifier pipeline).

    Loss per row: ``alpha * T^2 * BCE(sigmoid(z_t/T), sigmoid(z_s/T)) + (1 - alpha) *
    BCE(y, sigmoid(z_s))``. With ``hidden`` unset, one hidden layer as wide as fits in
    ``min(max_size_bytes, teacher bytes / compression)``, up to ``max_width``.
    """

    kind: Literal["distill"] = "distill"
    name: str
    hidden: tuple[int, ...] | None = None
    compression: float = Field(10.0, ge=1.0)
    max_width: int = Field(64, ge=1)
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1)
    epochs: int = Field(25, ge=1)
    batch_size: int = Field(256, ge=8)
    learning_rate: float = Field(3e-3, gt=0)
    restarts: int = Field(2, ge=1)
    clip: float = Field(4.0, gt=0)
    max_train_rows: int | None = Field(None, ge=100)

    @model_validator(mode="after")
    def _hidden_positive(self) -> DistillSpec:
        if self.hidden is not None and (not self.hidden or min(self.hidden) < 1):
            raise ValueError("hidden must list at least one layer width, each >= 1")
        return self


class PruneSpec(StrictModel):
    """Structured pruning: keep ``keep_fraction`` of each hidden layer's units, then fine-tune."""

    kind: Literal["prune"] = "prune"
    name: str
    source: str
    keep_fraction: float = Field(0.5, gt=0, lt=1)
    criterion: Literal["activation", "weight_norm"] = "weight_norm"
    finetune_epochs: int = Field(6, ge=0)
    learning_rate: float = Field(3e-3, gt=0)


class QuantizeSpec(StrictModel):
    """INT8 post-training quantization of a variant with ONNX Runtime."""

    kind: Literal["quantize"] = "quantize"
    name: str
    source: str
    mode: Literal["dynamic", "static"] = "dynamic"
    calibration: Literal["minmax", "entropy", "percentile"] | None = None
    per_channel: bool = False
    exclude_nodes: tuple[str, ...] = ()
    auto_exclude: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _calibration_for_static_only(self) -> QuantizeSpec:
        if self.mode == "static" and self.calibration is None:
            raise ValueError("static quantization needs a calibration method (minmax, entropy or percentile)")
        if self.mode == "dynamic" and self.calibration is not None:
            raise ValueError("dynamic quantization computes ranges at run time; remove 'calibration'")
        return self


VariantSpec = Annotated[BaselineSpec | DistillSpec | PruneSpec | QuantizeSpec, Field(discriminator="kind")]


def _default_variants() -> tuple[VariantSpec, ...]:
    return (
        BaselineSpec(name="float"),
        QuantizeSpec(name="float-int8-dynamic", source="float", mode="dynamic"),
        DistillSpec(name="student"),
        QuantizeSpec(name="student-int8-dynamic", source="student", mode="dynamic"),
        QuantizeSpec(
            name="student-int8-minmax",
            source="student",
            mode="static",
            calibration="minmax",
            per_channel=True,
            auto_exclude=1,
        ),
        DistillSpec(name="wide", hidden=(64, 32), epochs=8, restarts=1, compression=1.0),
        PruneSpec(name="wide-pruned", source="wide", keep_fraction=0.5),
        QuantizeSpec(name="wide-int8-dynamic", source="wide", mode="dynamic"),
        QuantizeSpec(
            name="wide-int8-entropy",
            source="wide",
            mode="static",
            calibration="entropy",
            per_channel=True,
            auto_exclude=1,
        ),
        QuantizeSpec(
            name="wide-int8-percentile",
            source="wide",
            mode="static",
            calibration="percentile",
            per_channel=True,
            auto_exclude=1,
        ),
        QuantizeSpec(name="wide-pruned-int8-dynamic", source="wide-pruned", mode="dynamic"),
    )


class EdgeBudget(StrictModel):
    """One device class's budget and the variants to build for it."""

    name: str = "pos-terminal"
    description: str = "Card terminal: a few kB of flash for the model, answers within milliseconds."
    device_classes: tuple[str, ...] = Field(("pos-terminal",), min_length=1)
    min_runtime_version: str = Field("1.20.0", pattern=r"^\d+(\.\d+){0,3}$")
    limits: EdgeLimits = EdgeLimits()
    select_by: Literal["size", "latency", "metric"] = "size"
    eval_rows: int = Field(50_000, ge=100)
    validation_fraction: float = Field(0.1, gt=0, lt=0.5)
    calibration_rows: int = Field(1024, ge=16)
    calibration_tail_fraction: float = Field(0.25, ge=0, le=1)
    calibration_batch: int = Field(64, ge=1)
    latency_repeats: int = Field(200, ge=10)
    fallback_rows: int = Field(60_000, ge=1000)
    seed: int = 11
    variants: tuple[VariantSpec, ...] = Field(default_factory=_default_variants, min_length=1)

    @model_validator(mode="after")
    def _variant_graph(self) -> EdgeBudget:
        seen: dict[str, str] = {}
        for spec in self.variants:
            if spec.name in seen:
                raise ValueError(f"variant name '{spec.name}' is used twice")
            source = getattr(spec, "source", None)
            if source is not None and source not in seen:
                raise ValueError(f"variant '{spec.name}': source '{source}' is not an earlier variant")
            seen[spec.name] = spec.kind
        if not any(s.kind == "baseline" for s in self.variants):
            raise ValueError(
                "the variants need a 'baseline' (the float teacher every variant is compared with)"
            )
        return self

    def spec(self, name: str) -> VariantSpec:
        """The variant named ``name``; ``KeyError`` when the budget has none."""
        for s in self.variants:
            if s.name == name:
                return s
        raise KeyError(name)


def load_budget(path: str | Path | None) -> EdgeBudget:
    """The budget in ``path`` (errors name the file and field); the embedded default for None."""
    if path is None:
        return EdgeBudget()
    return validate_model(EdgeBudget, read_yaml(Path(path)), str(path))


def runtime_tuple(version: str) -> tuple[int, ...]:
    """``"1.20.1"`` -> ``(1, 20, 1)``, ignoring any suffix such as ``.dev0`` or ``+cpu``."""
    parts: list[int] = []
    for piece in version.split("+")[0].split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.end() < len(piece):  # "0rc1": a pre-release of this number; stop here
            break
    return tuple(parts)
