"""Online request validation (mlops.request_validation): every client mistake is a 4xx that names it."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlops.datagen import fraud_schema
from mlops.request_validation import InvalidRequest, RequestValidator, parse_json

SCHEMA = fraud_schema()
V = RequestValidator(SCHEMA, max_rows=10)


def features() -> dict:
    out: dict = {f.name: float(f.min if f.min is not None else 0.0) for f in SCHEMA.numeric}
    out |= {f.name: f.categories[0] for f in SCHEMA.categorical}
    return out


def tensors(rows: int = 1) -> list[dict]:
    f = features()
    out = [
        {"name": n, "datatype": "FP32", "shape": [rows, 1], "data": [f[n]] * rows}
        for n in SCHEMA.numeric_names
    ]
    out += [
        {"name": n, "datatype": "BYTES", "shape": [rows, 1], "data": [f[n]] * rows}
        for n in SCHEMA.categorical_names
    ]
    return out


def problem(fn, *args) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        fn(*args)
    return info.value


# ----------------------------------------------------------------------------- /predict


def test_one_record_and_many_records_are_accepted_with_their_keys():
    """A single record and a {"records": [...]} batch both validate; ints become floats, keys are kept."""
    f = features() | {"amount": 12}
    [one] = V.predict({"features": f, "entity_key": 42, "request_id": "r-1", "ts": "2026-01-01T00:00:00"})
    assert one.features["amount"] == 12.0 and type(one.features["amount"]) is float
    assert (one.entity_key, one.request_id) == ("42", "r-1")
    many = V.predict({"records": [{"features": features()}, {"features": features(), "entity_key": "u"}]})
    assert [r.entity_key for r in many] == [None, "u"]


@pytest.mark.parametrize(
    ("mutate", "status", "needle"),
    [
        (lambda f: f.pop("amount"), 422, "missing feature(s) amount"),
        (lambda f: f.update(colour="red"), 422, "unknown feature(s) colour"),
        (lambda f: f.update(amount="12"), 422, "'amount' must be a number, got string"),
        (lambda f: f.update(amount=True), 422, "'amount' must be a number, got boolean"),
        (lambda f: f.update(amount=None), 422, "'amount' must be a number, got null"),
        (lambda f: f.update(amount=math.nan), 422, "'amount' is NaN"),
        (lambda f: f.update(amount=math.inf), 422, "'amount' is infinite"),
        (lambda f: f.update(amount=-1.0), 422, "'amount' = -1.0 is outside its valid range [0, 100000]"),
        (
            lambda f: f.update(channel="carrier-pigeon"),
            422,
            "'channel' = 'carrier-pigeon' is not a known category",
        ),
        (lambda f: f.update(channel=3), 422, "'channel' must be a string, got integer"),
    ],
    ids=[
        "missing",
        "extra",
        "string-number",
        "bool",
        "null",
        "nan",
        "inf",
        "range",
        "category",
        "int-category",
    ],
)
def test_bad_features_are_422_naming_the_feature(mutate, status, needle):
    """Given one bad feature, validation answers its status with a message naming the feature."""
    f = features()
    mutate(f)
    err = problem(V.predict, {"features": f})
    assert err.status == status
    assert needle in str(err), str(err)


def test_nan_and_infinity_literals_are_rejected_by_name():
    """NaN/Infinity JSON literals (which Python's parser accepts) reach validation and are named."""
    body = json.dumps({"features": features()}).replace('"amount": 0.0', '"amount": NaN')
    assert "'amount' is NaN" in str(problem(V.predict, parse_json(body.encode())))
    body = json.dumps({"features": features()}).replace('"utilization": 0.0', '"utilization": -Infinity')
    assert "'utilization' is infinite" in str(problem(V.predict, parse_json(body.encode())))


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"", 400, "empty body"),
        (b"{", 400, "malformed JSON"),
        (b"\xff\xfe", 400, "malformed JSON"),
        (b"[1, 2]", 400, "body must be a JSON object"),
        (b'{"features": 3}', 422, "features must be an object"),
        (b'{"records": {}}', 400, "records must be an array"),
        (b'{"records": []}', 422, "records is empty"),
        (b'{"nope": 1}', 422, "missing field 'features'"),
        (b'{"records": [], "x": 1}', 422, "unknown field(s) x"),
        (b'{"features": {}, "colour": 1}', 422, "unknown field(s) colour"),
        (b"[" * 100_000, 400, "malformed JSON"),
    ],
    ids=[
        "empty",
        "truncated",
        "binary",
        "array",
        "features-number",
        "records-object",
        "records-empty",
        "no-features",
        "extra-top",
        "extra-record",
        "deep",
    ],
)
def test_malformed_bodies_are_4xx(body, status, needle):
    """Bodies that are not the expected structure answer 400/422 with a message, never raise otherwise."""
    err = problem(lambda b: V.predict(parse_json(b)), body)
    assert err.status == status and needle in str(err), str(err)


def test_too_many_records_is_413_and_duplicate_ids_422():
    """More records than max_batch_rows is 413; two records with one request_id is 422."""
    assert problem(V.predict, {"records": [{"features": features()}] * 11}).status == 413
    dup = [{"features": features(), "request_id": "a"}, {"features": features(), "request_id": "a"}]
    assert "unique" in str(problem(V.predict, {"records": dup}))


def test_ranges_can_be_switched_off_but_float32_overflow_and_nan_never_pass():
    """Without range checks out-of-range numbers and unknown categories pass; NaN and float32 overflow do not."""
    loose = RequestValidator(SCHEMA, enforce_ranges=False)
    [r] = loose.predict({"features": features() | {"amount": -5.0, "channel": "new"}})
    assert r.features["amount"] == -5.0
    assert "float32" in str(problem(loose.predict, {"features": features() | {"amount": 1e39}}))
    assert "NaN" in str(problem(loose.predict, {"features": features() | {"amount": math.nan}}))


# ----------------------------------------------------------------------------- OIP v2


def test_v2_request_with_flat_or_nested_data_validates():
    """An OIP v2 request with one [N, 1] tensor per feature validates, flat or nested data alike."""
    req = V.v2_infer({"id": "x", "inputs": tensors(3), "parameters": {"entity_key": "u1"}}, ["probabilities"])
    assert (req.rows, req.id, req.entity_key, req.outputs) == (3, "x", "u1", ("probabilities",))
    nested = [t | {"data": [[v] for v in t["data"]]} for t in tensors(2)]
    assert V.v2_infer({"inputs": nested}, ["probabilities"]).rows == 2


def _with(tensor: str, **change) -> list[dict]:
    return [t | change if t["name"] == tensor else t for t in tensors(2)]


@pytest.mark.parametrize(
    ("inputs", "status", "needle"),
    [
        (_with("amount", datatype="FP64"), 400, "input 'amount' has datatype 'FP64', expected FP32"),
        (_with("channel", datatype="FP32"), 400, "input 'channel' has datatype 'FP32', expected BYTES"),
        (_with("amount", shape=[2]), 400, "input 'amount' has shape [2], expected [N, 1]"),
        (_with("amount", shape=[1, 2]), 400, "expected [N, 1]"),
        (
            _with("geo", shape=[3, 1], data=["home_region"] * 3),
            400,
            "input 'geo' has 3 rows, the first input has 2",
        ),
        (_with("amount", data=[1.0]), 400, "input 'amount' has 1 values, shape [2, 1] needs 2"),
        (_with("amount", data=[1.0, math.nan]), 422, "'amount' is NaN"),
        (_with("amount", data=[1.0, "2"]), 422, "'amount' must be a number, got string"),
        (_with("channel", data=["pos", 7]), 422, "'channel' must be a string"),
        (_with("amount", name="amount_usd"), 400, "input 'amount_usd' is not an input of the model"),
        ([t for t in tensors(2) if t["name"] != "geo"], 400, "missing input tensor(s) geo"),
        (tensors(2) + tensors(2)[:1], 400, "input 'amount' is given twice"),
        (_with("amount", shape=[11, 1], data=[1.0] * 11), 413, "limit is 10"),
        (
            _with("amount", parameters={"binary_data_size": 8}),
            400,
            "has both data and parameters.binary_data_size",
        ),
    ],
    ids=[
        "fp64",
        "bytes-as-fp32",
        "rank1",
        "wide",
        "rows-mismatch",
        "count",
        "nan",
        "string",
        "int-bytes",
        "unknown",
        "missing",
        "twice",
        "too-many",
        "binary",
    ],
)
def test_v2_shape_datatype_and_value_errors_are_4xx(inputs, status, needle):
    """Wrong tensor names, shapes, datatypes, counts or values answer 4xx naming the tensor."""
    err = problem(V.v2_infer, {"inputs": inputs}, ["probabilities"])
    assert err.status == status and needle in str(err), str(err)


def test_v2_unknown_output_and_fields_are_400():
    """Requesting an output the model lacks, or sending unknown request fields, is a 400."""
    err = problem(V.v2_infer, {"inputs": tensors(), "outputs": [{"name": "label"}]}, ["probabilities"])
    assert "output 'label' is not an output" in str(err) and err.status == 400
    assert problem(V.v2_infer, {"inputs": tensors(), "extra": 1}, ["probabilities"]).status == 422


# ----------------------------------------------------------------------------- feedback


def test_feedback_labels_must_come_from_the_schema():
    """Feedback takes request ids with labels from the schema's label values, one or many."""
    assert V.feedback({"request_id": "r", "label": 1}) == [("r", 1)]
    assert V.feedback({"feedback": [{"request_id": "a", "label": 0}, {"request_id": "b", "label": 1}]}) == [
        ("a", 0),
        ("b", 1),
    ]
    assert "label must be one of 0, 1" in str(problem(V.feedback, {"request_id": "r", "label": 2}))
    assert "label must be one of" in str(problem(V.feedback, {"request_id": "r", "label": True}))
    assert "missing field 'request_id'" in str(problem(V.feedback, {"label": 1}))


# ----------------------------------------------------------------------------- property


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    body=json_values,
    record=st.dictionaries(st.sampled_from([*SCHEMA.feature_names, "x"]), json_values, max_size=30),
)
def test_any_json_either_validates_or_is_a_4xx(body, record):
    """Whatever JSON arrives, validation returns rows or raises InvalidRequest with a 4xx: nothing else."""
    for candidate in (body, {"features": record}, {"records": [{"features": record}]}, {"inputs": [record]}):
        for check in (V.predict, V.feedback, lambda b: V.v2_infer(b, ["probabilities"])):
            try:
                check(candidate)
            except InvalidRequest as exc:
                assert 400 <= exc.status < 500
