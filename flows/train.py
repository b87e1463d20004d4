"""Training flow: validate -> split -> fit candidates -> ONNX + parity -> evaluate -> log -> register."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from adapters.runtime import configure
from mlops import modeling
from mlops.lineage import code_version, config_hash, data_fingerprint
from mlops.onnx_model import OnnxScorer
from mlops.reports import evaluation_plots, metrics_markdown
from mlops.settings import ModelSpec, Settings, load_settings, settings_digest
from tasks.data import load_dataset, validate_dataset
from tasks.registry import first_champion_or_gate, log_training_run, register_version


@dataclass(frozen=True)
class Candidate:
    """One fitted candidate, exported and checked."""

    label: str
    onnx_model: bytes
    metrics: dict[str, float]
    parity_max_abs_diff: float
    scores: np.ndarray


@dataclass(frozen=True)
class TrainSummary:
    model_name: str
    version: int
    selected: str
    run_id: str
    metrics: dict[str, float]
    candidates: dict[str, dict[str, float]]
    promoted_to_champion: bool
    gate: str
    lineage: dict[str, str] = field(default_factory=dict)


def candidate_label(spec: ModelSpec, index: int, specs: tuple[ModelSpec, ...]) -> str:
    same = [s for s in specs if s.kind == spec.kind]
    return spec.kind if len(same) == 1 else f"{spec.kind}_{index}"


def train_candidate(
    spec: ModelSpec, label: str, train: pd.DataFrame, test: pd.DataFrame, settings: Settings
) -> Candidate:
    """Fit, export to ONNX, refuse on parity failure, and evaluate the ONNX model itself."""
    schema, cfg = settings.dataset, settings.training
    pipe = modeling.fit(spec, train, schema, cfg.seed)
    onnx_model = modeling.to_onnx_bytes(pipe, schema)
    scorer = OnnxScorer(onnx_model, schema)
    parity = modeling.parity(pipe, scorer, test.head(cfg.parity_rows), cfg.parity_tolerance)
    modeling.require_parity(parity, label)
    scores = scorer.predict_proba(test)
    metrics = modeling.classification_metrics(modeling.labels(test, schema), scores, cfg.decision_threshold)
    metrics |= modeling.latency(scorer, test, cfg.latency_batch_rows, cfg.latency_repeats)
    metrics |= {"parity_max_abs_diff": parity.max_abs_diff, "onnx_bytes": float(len(onnx_model))}
    return Candidate(label, onnx_model, metrics, parity.max_abs_diff, scores)


@flow(name="train", log_prints=True)
def train_flow(data: str, config: str | None = None) -> TrainSummary:
    """Train the configured candidates on ``data`` and register the best as ``challenger``.

    The first version that passes the promotion gate also becomes ``champion``; later
    versions are only gated and reported (promote with ``mlops promote``).

    Args:
        data: Training data (Parquet or CSV) with the configured dataset's columns.
        config: Platform config YAML (default: $MLOPS_CONFIG, else built-in defaults).
    """
    settings = load_settings(config)
    configure(settings)
    logger = get_run_logger()
    schema, cfg = settings.dataset, settings.training

    frame = load_dataset(data)
    validate_dataset(frame, schema, require_label=True, source=data)
    lineage = {
        "lineage.data_path": data,
        "lineage.data_fingerprint": data_fingerprint([frame], schema.feature_names + (schema.label_column,)),
        "lineage.data_rows": str(len(frame)),
        "lineage.config_hash": config_hash(settings_digest(settings)),
        "lineage.code_version": code_version(),
        "lineage.flow_run_id": str(flow_run.get_id() or ""),
        "lineage.dataset": schema.name,
    }
    train, test = modeling.split(frame, schema, cfg)
    logger.info(
        "training %d candidates on %d rows, testing on %d", len(cfg.candidates), len(train), len(test)
    )

    candidates: dict[str, Candidate] = {}
    for i, spec in enumerate(cfg.candidates):
        label = candidate_label(spec, i, cfg.candidates)
        candidates[label] = train_candidate(spec, label, train, test, settings)
        logger.info("%s: %s", label, {k: round(v, 4) for k, v in candidates[label].metrics.items()})
    results = {label: c.metrics for label, c in candidates.items()}
    best = candidates[modeling.select_best(results, cfg.select_by)]

    y_test = modeling.labels(test, schema)
    files = evaluation_plots(y_test, {label: c.scores for label, c in candidates.items()})
    table = metrics_markdown(f"{cfg.model_name}: candidates", results, chosen=best.label)
    files["candidates.md"] = table.encode()
    metrics = dict(best.metrics) | {f"{label}.{k}": v for label, m in results.items() for k, v in m.items()}
    params = {
        "selected": best.label,
        "select_by": cfg.select_by,
        "train_rows": len(train),
        "test_rows": len(test),
    }
    params |= {
        f"{label}.spec": spec.model_dump_json()
        for label, spec in zip(candidates, cfg.candidates, strict=True)
    }
    example = modeling.features_frame(test.head(5), schema).astype(
        {n: np.float32 for n in schema.numeric_names}
    )
    logged = log_training_run(
        settings,
        run_name=f"train-{best.label}",
        params=params,
        metrics=metrics,
        tags=lineage | {"selected_candidate": best.label},
        files=files,
        onnx_model=best.onnx_model,
        example_features=example,
        example_scores=pd.DataFrame({"probability": best.scores[:5]}),
    )
    tags = (
        lineage
        | {
            "lineage.mlflow_run_id": logged.run_id,
            "lineage.candidate": best.label,
            "signature.inputs": ",".join(
                f"{t.name}:{t.datatype}" for t in OnnxScorer(best.onnx_model, schema).inputs
            ),
            "decision_threshold": str(cfg.decision_threshold),
        }
        | {f"metric.{k}": f"{best.metrics[k]:.6g}" for k in ("roc_auc", "pr_auc", "log_loss")}
    )
    version = register_version(settings, logged.model_uri, logged.run_id, tags, reason=f"trained on {data}")
    promoted, gate = first_champion_or_gate(settings, version.version, logged.run_id)

    create_markdown_artifact(
        key="training-summary",
        markdown=table
        + f"\n\nRegistered **{cfg.model_name} v{version.version}** (`challenger`)"
        + (" and promoted to `champion`." if promoted else ".")
        + f"\n\nPromotion gate: **{gate.outcome.value}**: {gate.reason}\n\nMLflow run `{logged.run_id}`",
        description="Candidates, selection and registration of this training run",
    )
    return TrainSummary(
        model_name=cfg.model_name,
        version=version.version,
        selected=best.label,
        run_id=logged.run_id,
        metrics=best.metrics,
        candidates=results,
        promoted_to_champion=promoted,
        gate=f"{gate.outcome.value}: {gate.reason}",
        lineage=lineage,
    )
