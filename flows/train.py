"""Training flow: validate -> split -> fit candidates -> ONNX + parity -> evaluate -> log -> sign -> register.

The flow only sequences calls: the computing lives in ``mlops.training`` (plain
functions), the reading, tracking and registering in tasks over adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from adapters.runtime import code_version, configure
from mlops import evaluation, modeling, training
from mlops.features import feature_views, model_schema
from mlops.settings import load_settings
from tasks.data import load_dataset, validate_dataset
from tasks.registry import first_champion_or_gate, log_evaluation_record, log_training_run, register_version


@dataclass(frozen=True)
class TrainSummary:
    """What one training run registered and how its candidates compared."""

    model_name: str
    version: int
    selected: str
    run_id: str
    metrics: dict[str, float]
    candidates: dict[str, dict[str, float]]
    promoted_to_champion: bool
    gate: str
    lineage: dict[str, str] = field(default_factory=dict)


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
    dataset, cfg = settings.dataset, settings.training
    fs = next(iter(feature_views(settings)), None)  # the declared view, if any: its windows become inputs
    schema = model_schema(dataset, fs)

    frame = load_dataset(data, dataset)
    validate_dataset(frame, dataset, require_label=True, source=data)
    lineage = training.lineage(data, frame, settings, code_version(), str(flow_run.get_id() or ""), fs)
    frame = training.training_frame(frame, fs, data)
    if fs is not None:
        logger.info("feature view %s: %d window features, point-in-time checked", fs.digest(), len(fs.names))
    train, test = modeling.split(frame, schema, cfg)
    logger.info(
        "training %d candidates on %d rows, testing on %d", len(cfg.candidates), len(train), len(test)
    )
    candidates = {}
    for i, spec in enumerate(cfg.candidates):
        label = training.candidate_label(spec, i, cfg.candidates)
        candidates[label] = training.train_candidate(spec, label, train, test, schema, cfg)
        logger.info("%s: %s", label, {k: round(v, 4) for k, v in candidates[label].metrics.items()})
    chosen = training.select(candidates, cfg)
    best = chosen.best
    evidence_files, evidence_tags = evaluation.evidence(train, test, schema)

    logged = log_training_run(
        settings,
        run_name=f"train-{best.label}",
        params=training.run_params(chosen, cfg, len(train), len(test))
        | ({"feature_view": fs.digest()} if fs is not None else {}),
        metrics=training.run_metrics(chosen),
        tags=lineage | {"selected_candidate": best.label},
        files=training.report_files(chosen, test, schema, cfg.model_name) | evidence_files,
        onnx_model=best.onnx_model,
        example_features=training.example_features(test, schema),
        example_scores=pd.DataFrame({"probability": best.scores[:5]}),
    )
    record_tag = log_evaluation_record(settings, cfg.model_name, logged, evidence_tags)
    tags = (
        training.version_tags(chosen, lineage, logged.run_id, schema, cfg.decision_threshold)
        | evidence_tags
        | record_tag
    )
    version = register_version(settings, logged.model_uri, logged.run_id, tags, reason=f"trained on {data}")
    promoted, gate = first_champion_or_gate(settings, version.version, logged.run_id)

    create_markdown_artifact(
        key="training-summary",
        markdown=training.candidates_table(chosen, cfg.model_name)
        + f"\n\nRegistered **{cfg.model_name} v{version.version}** (`challenger`)"
        + (" and promoted to `champion`." if promoted else ".")
        + f"\n\nPromotion gate: **{gate.outcome.value}**: {gate.reason}"
        + "".join(f"\n- {line}" for line in gate.evidence)
        + f"\n\nMLflow run `{logged.run_id}`",
        description="Candidates, selection and registration of this training run",
    )
    return TrainSummary(
        model_name=cfg.model_name,
        version=version.version,
        selected=best.label,
        run_id=logged.run_id,
        metrics=best.metrics,
        candidates=chosen.results,
        promoted_to_champion=promoted,
        gate=gate.describe(),
        lineage=lineage,
    )
