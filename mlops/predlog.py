"""The prediction log's contract, shared by the service that writes it and the rollout
gates that read it.

One row per model answer: the primary answer every request gets (``role='primary'``)
and, for mirrored requests, the candidate's shadow answer (``role='shadow'``) with the
same ``request_id``. Feedback (the label that arrives later) is a separate table joined
on ``request_id``. Feature values are logged too, so drift can be measured against the
training reference.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from mlops.settings import DatasetSchema

PRIMARY = "primary"
SHADOW = "shadow"
FEATURE_PREFIX = "f_"

BASE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("entity_key", pa.string()),
    pa.field("variant", pa.string(), nullable=False),  # stable | candidate
    pa.field("role", pa.string(), nullable=False),  # primary | shadow
    pa.field("mode", pa.string(), nullable=False),  # single | shadow | canary | ab | blue_green
    pa.field("model_name", pa.string(), nullable=False),
    pa.field("model_version", pa.int64(), nullable=False),
    pa.field("score", pa.float64()),  # null when the model call failed
    pa.field("decision", pa.bool_()),
    pa.field("latency_ms", pa.float64(), nullable=False),
    pa.field("status", pa.int32(), nullable=False),  # 200, or the HTTP status the model call ended in
    pa.field("error", pa.string()),
    pa.field("features_hash", pa.string(), nullable=False),
)

FEEDBACK_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


def log_schema(dataset: DatasetSchema) -> pa.Schema:
    """Arrow schema of prediction-log files for a dataset: base fields + one column per feature."""
    features = [pa.field(FEATURE_PREFIX + n, pa.float64()) for n in dataset.numeric_names]
    features += [pa.field(FEATURE_PREFIX + n, pa.string()) for n in dataset.categorical_names]
    return pa.schema(list(BASE_FIELDS) + features)


def features_hash(features: Mapping[str, Any]) -> str:
    """A short stable hash of one request's features (key order does not matter)."""
    text = json.dumps(features, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


# --------------------------------------------------------------------------- file names

PART_TIME_FORMAT = "%Y%m%dT%H%M%S%f"


def part_name(committed: datetime, pid: int, seq: int) -> str:
    """``part-<commit time>-<pid>-<seq>.parquet``: a committed log file, no row of it younger
    than its commit time (windowed reads skip older files by name)."""
    return f"part-{committed.astimezone(UTC).strftime(PART_TIME_FORMAT)}-{pid}-{seq:06d}.parquet"


def part_commit_time(name: str) -> datetime | None:
    """The commit time in a ``part_name`` (None for a file named otherwise)."""
    parts = name.split("-")
    try:
        return (
            datetime.strptime(parts[1], PART_TIME_FORMAT).replace(tzinfo=UTC) if parts[0] == "part" else None
        )
    except (IndexError, ValueError):
        return None
