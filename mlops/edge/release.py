"""Building release metadata: what a publisher signs for one model file.

Pure: the caller supplies the model bytes, the rows to compute golden outputs and the
reference distribution on, the clock, and signs and stores the result.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from mlops.edge import graph
from mlops.edge.manifest import (
    Golden,
    ModelManifest,
    Reference,
    SnapshotFile,
    TargetFile,
    TimestampMeta,
    iso,
    sha256_hex,
)
from mlops.edge.telemetry import reference_distribution
from mlops.onnx_model import OnnxScorer
from mlops.settings import DatasetSchema, EdgeConfig


def golden(model: bytes, rows: pd.DataFrame, schema: DatasetSchema, tolerance: float) -> Golden:
    """The golden inputs (plain JSON values per feature) and this model's probabilities on them."""
    p = OnnxScorer(model, schema).predict_proba(rows)
    inputs: dict[str, tuple[float | str, ...]] = {}
    for name in schema.numeric_names:
        inputs[name] = tuple(float(np.float32(v)) for v in rows[name])
    for name in schema.categorical_names:
        inputs[name] = tuple(str(v) for v in rows[name])
    expected = tuple(float(x) if math.isfinite(float(x)) else 0.0 for x in p)
    return Golden(inputs=inputs, expected=expected, tolerance=tolerance)


def reference(model: bytes, rows: pd.DataFrame, schema: DatasetSchema, bins: int) -> Reference:
    """The model's prediction distribution on held-out rows: quantile edges and shares."""
    p = OnnxScorer(model, schema).predict_proba(rows)
    edges, fractions = reference_distribution(np.nan_to_num(p, nan=0.0), bins)
    return Reference(edges=edges, fractions=fractions)


def release_document(
    *,
    model_name: str,
    version: int,
    variant: str,
    model: bytes,
    source_version: int | None,
    device_classes: tuple[str, ...],
    min_runtime_version: str,
    rows: pd.DataFrame,
    schema: DatasetSchema,
    edge: EdgeConfig,
    now: datetime,
    restores: int | None = None,
    baseline: tuple[int, Reference] | None = None,
) -> dict[str, Any]:
    """The ``signed`` part of a new release, at cohort 0% (a rollout widens it).

    ``baseline`` is the last good release and its prediction distribution: what the fleet
    serves now. The rollout's shift gate compares the new model's predictions on device
    traffic against it (so a model that answers differently from what devices ran is
    caught); without one (a first release) the release's own distribution is the reference.
    """
    sha = sha256_hex(model)
    graph.check(model)
    doc = ModelManifest(
        model=model_name,
        version=version,
        variant=variant,
        source_version=source_version,
        restores=restores,
        created=now,
        expires=now + timedelta(hours=edge.manifest_ttl_hours),
        target=TargetFile(name=f"{model_name}-v{version}.onnx", length=len(model), sha256=sha),
        device_classes=tuple(device_classes),
        min_runtime_version=min_runtime_version,
        cohort_percent=0.0,
        rollout_salt=f"{model_name}:{version}:{sha[:12]}",
        golden=golden(model, rows.iloc[: edge.golden_rows], schema, edge.golden_tolerance),
        reference=baseline[1] if baseline else reference(model, rows, schema, edge.reference_bins),
        reference_version=baseline[0] if baseline else version,
    )
    return signed_dict(doc)


def signed_dict(doc: ModelManifest) -> dict[str, Any]:
    """A release as the JSON object that is signed (timestamps in ``iso`` form)."""
    data = doc.model_dump(mode="json")
    data["created"], data["expires"] = iso(doc.created), iso(doc.expires)
    return data


def with_cohort(signed: Mapping[str, Any], percent: float, now: datetime, ttl_hours: float) -> dict[str, Any]:
    """The same release for a wider (or narrower) cohort, re-dated: it is re-signed at every stage."""
    doc = ModelManifest.model_validate_json(json.dumps(dict(signed)))
    update = {"cohort_percent": float(percent), "created": now, "expires": now + timedelta(hours=ttl_hours)}
    return signed_dict(doc.model_copy(update=update))


def timestamp_document(
    *,
    model_name: str,
    version: int,
    release_version: int,
    release_metadata: bytes,
    now: datetime,
    ttl_hours: float,
) -> dict[str, Any]:
    """The ``signed`` part of timestamp ``version``: ``release_metadata`` (release ``release_version``) is current.

    Short-lived by design: a device refuses it after ``ttl_hours``, which bounds how long
    an attacker who replays old metadata can keep a device from seeing a newer release.
    """
    doc = TimestampMeta(
        model=model_name,
        version=version,
        created=now,
        expires=now + timedelta(hours=ttl_hours),
        release=SnapshotFile(
            version=release_version, length=len(release_metadata), sha256=sha256_hex(release_metadata)
        ),
    )
    data = doc.model_dump(mode="json")
    data["created"], data["expires"] = iso(doc.created), iso(doc.expires)
    return data
