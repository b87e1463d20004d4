"""Promotion: the gate between challenger and champion (both scored on the same rows), applied
through the audited CAS."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from adapters.datasets import read_frame
from adapters.evaluation_keys import trusted_keys
from mlops import evaluation, training
from mlops.errors import ConfigError, DataError, EvidenceUntrusted, GateFailed, ModelError, NotFound
from mlops.features import feature_views, model_schema
from mlops.gates import CheckResult, GateResult, Outcome, promotion_gate
from mlops.onnx_model import OnnxScorer
from mlops.registry_model import ANY, CHAMPION, AliasMove, ExpectCurrent, VersionInfo
from mlops.settings import Settings
from registry.mlflow_registry import ModelRegistry


@dataclass(frozen=True)
class PromotionResult:
    """A completed alias move: the gate that allowed it (None when no gate applied) and the audited moves."""

    model: str
    alias: str
    version: int
    gate: GateResult | None
    moves: tuple[AliasMove, ...]


def champion_gate(settings: Settings, registry: ModelRegistry, name: str, version: int) -> GateResult:
    """Score the candidate and the champion on one evaluation set and gate the recomputed metrics.

    The evaluation set is ``promotion.evaluation_data`` when declared, else the candidate's
    holdout, used only through an evaluation record signed by a trusted training key for the
    candidate's run and ONNX file; rows either version trained on (by a verified record) are
    left out. Bounds and the regression against the champion are checked on the recomputed
    metrics; a gated metric that rows cannot give (latency, size) is read from the logged ones
    and the evidence says so. Anything that stops the evaluation (an unsigned, untrusted or
    mismatched record, a missing or corrupt artifact, a model whose inputs do not match) is an
    ERROR check with a one-line reason.
    """
    candidate = registry.version(name, version)
    champion_version = registry.aliases(name).get(CHAMPION)
    champion = None
    if champion_version is not None and champion_version != version:
        champion = registry.version(name, champion_version)
    gates = settings.promotion.gates
    if not candidate.tags.get(evaluation.RECORD_TAG) and settings.promotion.evaluation_data is None:
        if settings.promotion.trust_logged_metrics:
            result = promotion_gate(gates, candidate.metrics, champion.metrics if champion else None)
            return replace(result, evidence=("logged metrics as claimed by the runs, not recomputed",))
        unsigned = (
            f"holdout of v{version} is not signed by a trusted training key: "
            if candidate.tags.get(evaluation.HOLDOUT_TAG)
            else f"v{version} has no holdout and "
        )
        return _error(
            f"{unsigned}no evaluation record ({evaluation.RECORD_TAG}), and promotion.evaluation_data "
            "is not set: nothing trusted to score both versions on"
        )
    versions = [v for v in (candidate, champion) if v is not None]
    models = {v.version: registry.onnx_bytes(name, v.version) for v in versions}
    try:
        rows, where = evaluation_rows(settings, registry, candidate, champion, models)
        recomputed = {v.version: _metrics_on(settings, v.version, models[v.version], rows) for v in versions}
    except (DataError, ModelError, NotFound, ConfigError) as exc:  # a registry outage is raised, for retries
        return _error(f"evaluation of v{version}: {str(exc).splitlines()[0]}")
    logged_only = sorted({g.metric for g in gates} - set(recomputed[version]))
    cand = candidate.metrics | recomputed[version]
    champ = champion.metrics | recomputed[champion.version] if champion is not None else None
    notes = [f"evaluated on {where.describe()}", evaluation.metrics_line(f"v{version}", recomputed[version])]
    if champion is not None:
        notes.append(evaluation.metrics_line(f"champion v{champion.version}", recomputed[champion.version]))
    if logged_only:
        notes.append(f"{', '.join(logged_only)}: logged, not recomputed")
    return replace(promotion_gate(gates, cand, champ), evidence=tuple(notes))


def _metrics_on(settings: Settings, version: int, onnx_model: bytes, rows: pd.DataFrame) -> dict[str, float]:
    schema = model_schema(settings.dataset, next(iter(feature_views(settings)), None))
    try:
        scorer = OnnxScorer(onnx_model, schema)
        return evaluation.metrics_on(scorer, rows, schema, settings.training.decision_threshold)
    except (DataError, ModelError) as exc:
        raise ModelError(f"model v{version}: {str(exc).splitlines()[0]}") from exc


def _error(reason: str) -> GateResult:
    return GateResult((CheckResult("evaluation", Outcome.ERROR, reason),))


def evaluation_rows(
    settings: Settings,
    registry: ModelRegistry,
    candidate: VersionInfo,
    champion: VersionInfo | None,
    models: Mapping[int, bytes],
) -> tuple[pd.DataFrame, evaluation.EvaluationSet]:
    """The rows both versions are scored on, without rows either trained on, and their description.

    ``models`` holds the ONNX file the gate scores for each version; a record must be signed for
    it. Raises ``EvidenceUntrusted`` when the candidate's holdout has no valid record, and
    ``DataError``/``NotFound`` (one line) when an artifact is missing, corrupt or lacks a model
    column, or too few rows are left. Training rows without a valid record are not used: the
    result says that version's overlap was not checked, and why.
    """
    fs = next(iter(feature_views(settings)), None)
    schema = model_schema(settings.dataset, fs)
    declared = settings.promotion.evaluation_data
    trusted = trusted_keys(settings)
    versions = [v for v in (candidate, champion) if v is not None]
    records: dict[int, evaluation.EvaluationRecord | str] = {}
    for v in versions:
        needed = v is candidate and declared is None  # its holdout is the evaluation set
        what = f"{'holdout' if needed else 'training-row list'} of v{v.version}"
        try:
            records[v.version] = verified_record_of(registry, v, models[v.version], trusted, what)
        except EvidenceUntrusted as exc:
            if needed:
                raise
            records[v.version] = str(exc)
    if declared is not None:
        data = _read_file(declared)
        digest = evaluation.sha256(data)
        frame = training.training_frame(read_frame(declared, settings.dataset), fs, declared)
        frame = evaluation.checked_frame(frame, schema, f"promotion.evaluation_data {declared}")
        source = f"declared evaluation data {declared}"
        signed_by: tuple[str, ...] = ()
    else:
        what = f"holdout of v{candidate.version}"
        record = records[candidate.version]
        if isinstance(record, str):  # not reached: a candidate whose holdout is needed raised above
            raise EvidenceUntrusted(record)
        digest = record.holdout_sha256
        data = _artifact(registry, candidate, evaluation.holdout_file(digest), what)
        frame = evaluation.read_holdout(evaluation.verified(data, digest, what), schema, what)
        source = what
        signed_by = (f"record signed by training key {record.keyid[:12]}",)
    trained: dict[str, np.ndarray | str] = {}
    for v in versions:
        record = records[v.version]
        trained[f"v{v.version}"] = record if isinstance(record, str) else _trained_rows(registry, v, record)
    rows, excluded, notes = evaluation.exclude_trained(frame, schema, trained)
    where = evaluation.EvaluationSet(source, digest, len(rows), excluded, (*signed_by, *notes))
    evaluation.usable(rows, schema, settings.promotion.min_evaluation_rows, len(frame), source)
    return rows, where


def verified_record_of(
    registry: ModelRegistry,
    v: VersionInfo,
    onnx_model: bytes,
    trusted: Mapping[str, Ed25519PublicKey],
    what: str,
) -> evaluation.EvaluationRecord:
    """``v``'s evaluation record, verified against the trusted keys, its run and ``onnx_model``."""
    if not v.tags.get(evaluation.RECORD_TAG):
        raise EvidenceUntrusted(f"{what} is not signed: no evaluation record ({evaluation.RECORD_TAG})")
    label = f"evaluation record of v{v.version}"
    try:
        digest = evaluation.recorded_digest(v.tags, evaluation.RECORD_TAG, label)
        data = evaluation.verified(
            _artifact(registry, v, evaluation.record_file(digest), label), digest, label
        )
    except (DataError, NotFound) as exc:
        raise EvidenceUntrusted(f"{what} is not signed: {str(exc).splitlines()[0]}") from None
    return evaluation.verified_record(
        data, trusted, name=v.name, version=v.version, run_id=v.run_id or "", onnx_model=onnx_model, what=what
    )


def _read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"promotion.evaluation_data {path}: {exc.strerror or exc}") from None


def _artifact(registry: ModelRegistry, version: VersionInfo, file: str, what: str) -> bytes:
    if not version.run_id:
        raise NotFound(f"{what}: v{version.version} has no training run")
    try:
        return registry.run_artifact(version.run_id, f"{evaluation.ARTIFACT_DIR}/{file}")
    except NotFound:
        raise NotFound(
            f"{what} is missing: run {version.run_id} has no {evaluation.ARTIFACT_DIR}/{file}"
        ) from None


def _trained_rows(
    registry: ModelRegistry, version: VersionInfo, record: evaluation.EvaluationRecord
) -> np.ndarray:
    what = f"training-row hashes of v{version.version}"
    digest = record.train_rows_sha256
    data = _artifact(registry, version, evaluation.train_rows_file(digest), what)
    return evaluation.read_row_hashes(evaluation.verified(data, digest, what), what)


def promote(
    settings: Settings,
    registry: ModelRegistry,
    *,
    name: str,
    alias: str,
    version: int,
    reason: str,
    expect_current: ExpectCurrent = ANY,
    skip_gate: bool = False,
    run_id: str | None = None,
) -> PromotionResult:
    """Move ``alias`` to ``version``; a move to ``champion`` must pass the promotion gate.

    Raises ``GateFailed`` (nothing moved) when the gate does not pass, ``StaleAlias`` when
    ``expect_current`` no longer holds.
    """
    gate = None
    if alias == CHAMPION and not skip_gate:
        gate = champion_gate(settings, registry, name, version)
        if not gate.passed:
            raise GateFailed(f"'{name}' v{version} not promoted to {alias}: {gate.describe()}")
    action = "promote" if not skip_gate else "promote-ungated"
    audited = f"{reason} (gate {gate.describe()})" if gate is not None else reason
    moves = registry.move_alias(
        name, alias, version, reason=audited, expect_current=expect_current, action=action, run_id=run_id
    )
    return PromotionResult(name, alias, version, gate, tuple(moves))
