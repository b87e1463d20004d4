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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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


# --------------------------------------------------------------------------- compaction

MERGED_PREFIX = "merged"
COMPACTION_JOURNAL = "_compaction.json"


def merged_name(committed: datetime, compaction_id: str, seq: int) -> str:
    """``merged-<commit time>-<id>-<seq>.parquet``: a file of a compacted day.

    Its commit time is the newest of the files merged into it, so a windowed read that
    would have opened any of them opens it (no row of it is younger than that time)."""
    return f"{MERGED_PREFIX}-{committed.astimezone(UTC).strftime(PART_TIME_FORMAT)}-{compaction_id}-{seq:04d}.parquet"


def file_commit_time(name: str) -> datetime | None:
    """The commit time in a ``part_name`` or a ``merged_name`` (None for any other name)."""
    head = name.split("-", 1)[0]
    if head == MERGED_PREFIX:
        return part_commit_time("part-" + name.split("-", 1)[1])
    return part_commit_time(name)


@dataclass(frozen=True)
class Compaction:
    """A day folder's compaction journal: ``merged`` files replace the ``sources`` parts.

    Written with one atomic rename, it is the switch point of a compaction: before it,
    readers read the sources; from it on, the merged files and none of the sources (which
    are deleted afterwards). It stays in place until the next compaction of the day
    replaces it."""

    merged: tuple[str, ...]
    sources: tuple[str, ...]

    def to_json(self) -> str:
        """The journal's file content."""
        return json.dumps({"merged": list(self.merged), "sources": list(self.sources)})

    @classmethod
    def from_json(cls, text: str) -> Compaction | None:
        """The journal in ``text``, or None if it is not one."""
        try:
            data = json.loads(text)
            return cls(tuple(map(str, data["merged"])), tuple(map(str, data["sources"])))
        except (ValueError, KeyError, TypeError):
            return None


def visible_files(listing: Iterable[str], journal: Compaction | None) -> list[str]:
    """The files of one day folder a reader must read, from the folder's names (listed
    before the journal was read) and its journal: the writer's parts that no compaction
    merged, plus the merged files of the journal. Sorted, each once."""
    names = set(listing)
    parts = {n for n in names if n.startswith("part-") and n.endswith(".parquet")}
    if journal is None:
        return sorted(parts)
    return sorted((parts - set(journal.sources)) | set(journal.merged))


def closed_days(days: Iterable[str], now: datetime, grace: timedelta) -> list[str]:
    """The days (``YYYY-MM-DD``, UTC) no writer adds to any more: ended at least ``grace``
    before ``now`` (a writer's last flush of a day can land just after midnight)."""
    last_closed = (now.astimezone(UTC) - grace).date()
    out = []
    for day in days:
        try:
            if datetime.strptime(day, "%Y-%m-%d").date() < last_closed:
                out.append(day)
        except ValueError:
            continue
    return sorted(out)
