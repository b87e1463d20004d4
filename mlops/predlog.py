"""The prediction log's contract, shared by the service that writes it and the rollout
gates that read it.

One row per model answer: the primary answer every request gets (``role='primary'``)
and, for mirrored requests, the candidate's shadow answer (``role='shadow'``) with the
same ``request_id``. Feedback (the label that arrives later) is a separate table joined
on ``request_id``; a request's first label is the one that counts. Feature values are
logged too, so drift can be measured against the training reference.

Request ids are issued by the service (``RequestIds``): a client's own id (if it sent one),
a part unique to this answer, and a keyed tag only the service's secret produces. So a
label can be given only for an answer the service issued, two answers never share an id
(a caller reusing someone else's id gets a different one), and the tag still verifies
after a restart (the secret is kept under MLOPS_HOME).

``forced`` marks an answer whose variant the caller chose (the ``x-mlops-variant`` header,
or a request to one version's endpoint) instead of the router: such rows are served and
logged but are evidence of nothing, so rollout gates and the A/B test leave them out.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import secrets
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
    pa.field("forced", pa.bool_()),  # the caller chose the variant; null in logs from before the column
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


# --------------------------------------------------------------------------- request ids

ID_SEP = "."
TAG_BYTES = 12
ID_KEY_BYTES = 32
"""Random bytes behind a generated token or request-id key."""


class RequestIds:
    """Issues request ids that only the holder of ``key`` can mint, and verifies them.

    An issued id is ``[<client id>.]<unique>.<tag>``: ``unique`` is a random prefix per
    process (drawn again after a fork) plus a counter, so ids never repeat without a random
    draw per request (``os.urandom`` per request releases the GIL, and under load the
    scoring threads then keep the event loop waiting); ``tag`` is a keyed BLAKE2b MAC of
    everything before it. Verifying needs only the key, so it holds after a restart.
    """

    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ValueError("the request-id key must have at least 16 bytes")
        if len(key) > 64:  # BLAKE2b keys hold at most 64 bytes
            key = hashlib.blake2b(key).digest()
        self._mac = hashlib.blake2b(key=key, digest_size=TAG_BYTES)  # keyed once, copied per id
        self._pid = -1
        self._prefix = ""
        self._count = itertools.count()

    def _tag(self, body: str) -> str:
        mac = self._mac.copy()
        mac.update(body.encode())
        return mac.hexdigest()

    def issue(self, client_id: str | None = None) -> str:
        """A new id for one answer, carrying ``client_id`` (the caller's own id) when given."""
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._prefix = secrets.token_hex(8)
            self._count = itertools.count()
        unique = f"{self._prefix}{next(self._count):08x}"
        body = unique if client_id is None else f"{client_id}{ID_SEP}{unique}"
        return f"{body}{ID_SEP}{self._tag(body)}"

    def verify(self, request_id: str) -> bool:
        """Whether ``request_id`` was issued with this key."""
        body, sep, tag = request_id.rpartition(ID_SEP)
        if not sep or not body or len(tag) != 2 * TAG_BYTES:
            return False
        return hmac.compare_digest(tag, self._tag(body))


def client_request_id(request_id: str) -> str | None:
    """The caller's own id inside an issued id (None when the caller sent none)."""
    parts = request_id.rsplit(ID_SEP, 2)
    return parts[0] if len(parts) == 3 else None


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
