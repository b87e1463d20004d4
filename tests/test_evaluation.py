"""The gate's evaluation evidence as pure functions: content-addressed holdouts, training-row exclusion."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mlops import evaluation
from mlops.datagen import generate
from mlops.errors import DataError
from mlops.settings import load_settings

SCHEMA = load_settings(environ={}).dataset


def test_a_holdout_is_content_addressed_and_reads_back_as_the_same_rows() -> None:
    """The same rows give the same bytes and hash; read back, they hash to the same row set."""
    rows = generate(500, seed=4)
    files, tags = evaluation.evidence(rows.iloc[:300], rows.iloc[300:], SCHEMA)
    again, _ = evaluation.evidence(rows.iloc[:300], rows.iloc[300:], SCHEMA)
    assert files == again and tags[evaluation.HOLDOUT_ROWS_TAG] == "200"
    digest = tags[evaluation.HOLDOUT_TAG]
    data = evaluation.verified(files[evaluation.holdout_file(digest)], digest, "holdout")
    back = evaluation.read_holdout(data, SCHEMA, "holdout")
    assert np.array_equal(evaluation.row_hashes(back, SCHEMA), evaluation.row_hashes(rows.iloc[300:], SCHEMA))


def test_rows_a_version_trained_on_are_left_out_and_unknown_training_rows_are_said() -> None:
    """Evaluation rows found in a version's training rows are dropped and counted; a version
    whose training rows are unknown gets a note instead."""
    rows = generate(400, seed=5)
    trained = evaluation.row_hashes(rows.iloc[:250], SCHEMA)
    kept, excluded, notes = evaluation.exclude_trained(
        rows.iloc[200:], SCHEMA, {"v1": trained, "v2": "no record"}
    )
    assert (len(kept), excluded) == (150, 50)
    assert notes == ("v2's training rows unknown: overlap not checked (no record)",)


def test_corrupt_evidence_is_a_one_line_data_error() -> None:
    """Wrong bytes, a tag that is not a SHA-256, a truncated hash list, a holdout without the
    label, or too few rows left once training rows are out each raise DataError naming the problem."""
    rows = generate(300, seed=6)
    data = evaluation.holdout_bytes(rows, SCHEMA)
    with pytest.raises(DataError, match="holdout is corrupt: sha256"):
        evaluation.verified(data + b"x", evaluation.sha256(data), "holdout")
    with pytest.raises(DataError, match="is not a SHA-256"):
        evaluation.recorded_digest({evaluation.HOLDOUT_TAG: "../../etc/passwd"}, evaluation.HOLDOUT_TAG, "v2")
    with pytest.raises(DataError, match="not a list of 64-bit hashes"):
        evaluation.read_row_hashes(b"\0" * 12, "training rows")
    with pytest.raises(DataError, match="not readable Parquet"):
        evaluation.read_holdout(b"not parquet", SCHEMA, "holdout")
    with pytest.raises(DataError, match=f"lacks model column\\(s\\): {SCHEMA.label_column}"):
        evaluation.checked_frame(rows.drop(columns=[SCHEMA.label_column]), SCHEMA, "h")
    with pytest.raises(DataError, match="must be 0 or 1"):
        evaluation.checked_frame(rows.assign(**{SCHEMA.label_column: 2}), SCHEMA, "h")
    assert len(evaluation.usable(rows, SCHEMA, 400, len(rows), "holdout")) == 300  # small, but whole
    with pytest.raises(
        DataError, match="has 300 of 1000 rows left without training rows, fewer than promotion"
    ):
        evaluation.usable(rows, SCHEMA, 400, 1000, "holdout")
    with pytest.raises(DataError, match="single class"):
        evaluation.usable(rows[rows[SCHEMA.label_column] == 0], SCHEMA, 1, 1, "holdout")


def test_an_evaluation_record_verifies_only_for_its_key_run_name_and_model() -> None:
    """A signed record verifies for the run, model name and ONNX bytes it names under the key
    that signed it; altered content, another key, run, name or model each raise EvidenceUntrusted
    with one line saying which."""
    import json
    from datetime import UTC, datetime

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from mlops.edge.manifest import key_id
    from mlops.errors import EvidenceUntrusted

    rows = generate(400, seed=7)
    _, tags = evaluation.evidence(rows.iloc[:300], rows.iloc[300:], SCHEMA)
    key = Ed25519PrivateKey.generate()
    files, record_tag = evaluation.signed_record("m", "run1", b"onnx", tags, key, datetime.now(UTC))
    [(name, data)] = files.items()
    assert name == evaluation.record_file(record_tag[evaluation.RECORD_TAG])
    trusted = {key_id(key.public_key()): key.public_key()}
    ok = {"name": "m", "version": 3, "run_id": "run1", "onnx_model": b"onnx", "what": "holdout of v3"}
    record = evaluation.verified_record(data, trusted, **ok)
    assert record.holdout_sha256 == tags[evaluation.HOLDOUT_TAG] and record.keyid == key_id(key.public_key())

    env = json.loads(data)
    env["signed"]["holdout_sha256"] = "0" * 64
    cases = [
        (
            json.dumps(env).encode(),
            ok,
            "holdout of v3 is not signed by a trusted training key (signature by key",
        ),
        (data, ok | {"run_id": "run2"}, "evaluation record of v3 names run run1, the version's run is run2"),
        (data, ok | {"name": "other"}, "evaluation record of v3 names model 'm', not 'other'"),
        (
            data,
            ok | {"onnx_model": b"x"},
            "model of v3 is not the model its evaluation record was signed for",
        ),
    ]
    for bad, args, message in cases:
        with pytest.raises(EvidenceUntrusted, match=re.escape(message)):
            evaluation.verified_record(bad, trusted, **args)
    with pytest.raises(EvidenceUntrusted, match="not signed by a trusted training key \\(.*untrusted key"):
        evaluation.verified_record(data, {}, **ok)
