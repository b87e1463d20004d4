"""Fingerprints that tie a model version to exactly what produced it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal data, equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of a config (first 16 hex digits)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


def data_fingerprint(frames: Iterable[pd.DataFrame], columns: Sequence[str]) -> str:
    """sha256 over the schema and the row hashes of ``columns``, block by block.

    Independent of how the data is split into blocks and of the index; any change to a
    value, a row's order, a column's type or the column list changes the fingerprint.
    """
    digest = hashlib.sha256()
    rows = 0
    schema_seen = False
    for frame in frames:
        sub = frame.loc[:, list(columns)]
        if not schema_seen:
            digest.update(canonical_json([[c, str(sub[c].dtype)] for c in columns]).encode())
            schema_seen = True
        digest.update(pd.util.hash_pandas_object(sub, index=False).to_numpy().tobytes())
        rows += len(sub)
    digest.update(f"rows={rows}".encode())
    return digest.hexdigest()[:16]
