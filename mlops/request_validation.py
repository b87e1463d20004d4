"""Online request validation: the rules a serving request must meet, from the dataset schema.

Pure (no web framework, no model): the serving layer hands over the parsed JSON body and
gets back validated rows, or an ``InvalidRequest`` whose message names the problem and
whose ``status`` is the HTTP status to answer with. Every client error is one of these, so
the service never answers a client's mistake with a 5xx.

Three request shapes:

``/predict``
    One record ``{"features": {...}, "request_id"?, "entity_key"?, "ts"?}`` or many
    ``{"records": [record, ...]}``. ``features`` must hold exactly the schema's features:
    numbers (JSON int or float, not bool) for numeric ones, strings for categorical ones.
    When window features are declared (``RequestValidator(..., online=OnlineKeys(...))``),
    ``features`` may also hold any of the window features (finite numbers) and, for the
    service to look the missing ones up, the entity id (``ENTITY_ID``: 1-128 letters, digits
    and ``_ . @ + -``, no ``..``) and the event time (ISO 8601; without a zone, UTC): a raw
    transaction. The entity id then also routes the record unless ``entity_key`` is given.
``/v2/models/{name}/infer``
    An Open Inference Protocol v2 request: one ``[N, 1]`` tensor per feature, ``FP32`` for
    numeric and ``BYTES`` for categorical features (the ONNX graph's own inputs), data flat
    (row-major) or nested.
``/feedback``
    ``{"request_id", "label"}`` or ``{"feedback": [...]}``, labels from the schema.

OIP requests may use the binary tensor data extension: an ``Inference-Header-Content-Length``
header gives the length of the JSON header at the start of the body; the bytes after it are
the data of every input whose ``parameters.binary_data_size`` is set, in input order (FP32
as little-endian float32, BYTES as a little-endian uint32 length before each element).
``split_binary`` separates the two; ``v2_infer`` checks that the sizes add up, match each
tensor's shape and datatype, and reads the values as if they had come as JSON.

Values: numbers must be finite (NaN and infinity are rejected, also when they arrive as
``NaN``/``Infinity`` literals, which Python's JSON parser accepts) and, unless range
checks are off, inside the schema's ``[min, max]``; without range checks they must still
fit float32, the model's input type. Categorical values must be one of the schema's
categories (unless range checks are off) and at most ``MAX_STRING`` characters.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from mlops.errors import DataError
from mlops.settings import DatasetSchema

FLOAT32_MAX: Final = 3.4028234663852886e38
MAX_STRING: Final = 256
MAX_ID: Final = 128
MAX_ISSUED_ID: Final = 256  # an issued id: the client's (<= MAX_ID) + ".<24 hex>.<24 hex>" (+ ":<row>")
RECORD_FIELDS: Final = frozenset({"features", "request_id", "entity_key", "ts"})
FEEDBACK_FIELDS: Final = frozenset({"request_id", "label"})
V2_REQUEST_FIELDS: Final = frozenset({"id", "parameters", "inputs", "outputs"})
V2_INPUT_FIELDS: Final = frozenset({"name", "shape", "datatype", "data", "parameters"})
NUMERIC_DATATYPE: Final = "FP32"
STRING_DATATYPE: Final = "BYTES"
MAX_INT_DIGITS: Final = 4300
"""Longest integer literal a body may hold (Python's own limit on int/str conversion)."""
ENTITY_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}")
"""An entity id the online feature lookup accepts (and nothing else: no wildcards, separators
beyond these, control characters or ``..``)."""
MAX_TIME: Final = 40
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
LAST_TIME: Final = datetime(2262, 1, 1, tzinfo=UTC)  # int64 nanoseconds end in April 2262
BINARY_HEADER: Final = "inference-header-content-length"
"""Header of the OIP binary tensor data extension: length of the JSON part of the body."""


class InvalidRequest(DataError):
    """A serving request is malformed or breaks the dataset schema.

    ``status`` is the HTTP status to answer with: 400 for a body that is not the expected
    structure (bad JSON, wrong tensor shape or datatype), 413 for too many rows, 422 for
    well-formed requests whose values break the schema.
    """

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Record:
    """One validated row: the features as the model takes them, plus its keys.

    ``entity`` and ``ts_ns`` are the entity id and event time of a raw transaction (for the
    online feature lookup), None when the caller did not send them."""

    features: dict[str, float | str]
    request_id: str | None = None
    entity_key: str | None = None
    entity: str | None = None
    ts_ns: int | None = None


@dataclass(frozen=True)
class OnlineKeys:
    """What a raw transaction may carry besides the dataset's features: the declared window
    features, the entity id column and the event time column."""

    windows: tuple[str, ...]
    entity_column: str
    timestamp_column: str


@dataclass(frozen=True, slots=True)
class V2Request:
    """A validated OIP v2 inference request: ``columns`` maps each feature to its ``rows`` values."""

    rows: int
    columns: dict[str, list[float] | list[str]]
    id: str | None = None
    entity_key: str | None = None
    outputs: tuple[str, ...] = ()
    binary_outputs: frozenset[str] = frozenset()
    entities: tuple[str, ...] | None = None  # a raw transaction's entity id per row
    times_ns: tuple[int, ...] | None = None  # and its event time per row


def _nan_literal(name: str) -> float:
    # Python's json accepts NaN / Infinity / -Infinity; keep them as floats so the
    # feature check can name the field they were sent for.
    return float(name.replace("Infinity", "inf"))


def _int_literal(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise InvalidRequest(
            f"malformed JSON: an integer literal of {digits} digits is too long (limit {MAX_INT_DIGITS})", 400
        )
    return int(text)


def parse_json(body: bytes) -> Any:
    """The parsed JSON body, or ``InvalidRequest`` (400) saying where it is malformed."""
    if not body:
        raise InvalidRequest("empty body: expected a JSON document", 400)
    try:
        return json.loads(body, parse_constant=_nan_literal, parse_int=_int_literal)
    except UnicodeDecodeError:
        raise InvalidRequest("body is not UTF-8 text", 400) from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", 400
        ) from None
    except RecursionError:
        raise InvalidRequest("malformed JSON: nested too deeply", 400) from None


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def _short(value: object) -> str:
    if type(value) is int and abs(value) >= 10**40:  # its digits are no use in a message
        return f"{'a negative' if value < 0 else 'an'} integer of {len(str(abs(value)))} digits"
    try:
        text = repr(value)
    except RecursionError:
        return f"a deeply nested {_type_name(value)}"
    return text if len(text) <= 40 else text[:37] + "..."


def split_binary(body: bytes, header_length: str) -> tuple[Any, bytes]:
    """The parsed JSON header and the binary tensor data of a body sent with the binary
    tensor data extension (``header_length`` is the ``Inference-Header-Content-Length``)."""
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 15:
        raise InvalidRequest(
            f"Inference-Header-Content-Length must be a byte count, got {_short(header_length)}", 400
        )
    n = int(text)
    if n > len(body):
        raise InvalidRequest(
            f"Inference-Header-Content-Length is {n} but the body has only {len(body)} bytes", 400
        )
    return parse_json(body[:n]), body[n:]


def _identifier(value: object, what: str, limit: int = MAX_ID) -> str | None:
    if value is None:
        return None
    if type(value) is int:
        value = str(value)
    if type(value) is not str:
        raise InvalidRequest(f"{what} must be a string, got {_type_name(value)}")
    if not 0 < len(value) <= limit or not value.isprintable():
        raise InvalidRequest(f"{what} must be 1-{limit} printable characters")
    return value


def entity_id(value: object, what: str) -> str:
    """An entity id for the online feature lookup (``ENTITY_ID``; a JSON integer becomes its digits)."""
    if type(value) is int:
        value = str(value)
    if type(value) is not str:
        raise InvalidRequest(f"{what} must be a string, got {_type_name(value)}")
    if not ENTITY_ID.fullmatch(value) or ".." in value:
        raise InvalidRequest(
            f"{what} must be 1-128 letters, digits or _ . @ + - (starting with a letter or digit, no '..'), "
            f"got {_short(value)}"
        )
    return value


def event_time_ns(value: object, what: str) -> int:
    """An ISO 8601 event time (without a zone: UTC) as int64 nanoseconds since the epoch."""
    if type(value) is not str:
        raise InvalidRequest(f"{what} must be an ISO 8601 time string, got {_type_name(value)}")
    try:
        if len(value) > MAX_TIME:
            raise ValueError
        when = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{what} is not an ISO 8601 time: {_short(value)}") from None
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    if not EPOCH <= when < LAST_TIME:
        raise InvalidRequest(f"{what} = {_short(value)} is outside 1970-2261")
    delta = when - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def _unknown(keys: object, allowed: frozenset[str], where: str) -> None:
    extra = sorted(str(k) for k in keys if k not in allowed)  # type: ignore[attr-defined]
    if extra:
        raise InvalidRequest(
            f"{where}: unknown field(s) {', '.join(extra)} (allowed: {', '.join(sorted(allowed))})"
        )


class RequestValidator:
    """Validates serving requests against one dataset schema (built once, used per request)."""

    def __init__(
        self,
        schema: DatasetSchema,
        *,
        enforce_ranges: bool = True,
        max_rows: int = 1000,
        online: OnlineKeys | None = None,
    ) -> None:
        self.schema = schema
        self.max_rows = max_rows
        self.enforce_ranges = enforce_ranges
        self.online = online
        self.feature_names = schema.feature_names
        self._names = frozenset(schema.feature_names)
        self._windows = frozenset(online.windows) if online else frozenset()
        self._numeric: tuple[tuple[str, float, float], ...] = tuple(
            (
                f.name,
                f.min if enforce_ranges and f.min is not None else -FLOAT32_MAX,
                f.max if enforce_ranges and f.max is not None else FLOAT32_MAX,
            )
            for f in schema.numeric
        )
        self._categorical: tuple[tuple[str, frozenset[str] | None], ...] = tuple(
            (f.name, frozenset(f.categories) if enforce_ranges else None) for f in schema.categorical
        )
        self._specs = {n: NUMERIC_DATATYPE for n in schema.numeric_names} | {
            n: STRING_DATATYPE for n in schema.categorical_names
        }
        if online is not None:
            self._specs |= {n: NUMERIC_DATATYPE for n in online.windows} | {
                online.entity_column: STRING_DATATYPE,
                online.timestamp_column: STRING_DATATYPE,
            }
        self._labels = frozenset(schema.label_values)

    # ----------------------------------------------------------------- values

    def _number_problem(self, name: str, value: object, lo: float, hi: float) -> str:
        if type(value) not in (int, float):
            return f"'{name}' must be a number, got {_type_name(value)} {_short(value)}"
        if type(value) is float and math.isnan(value):
            return f"'{name}' is NaN; only finite numbers are accepted"
        if type(value) is float and math.isinf(value):
            return f"'{name}' is infinite; only finite numbers are accepted"
        if self.enforce_ranges:
            return f"'{name}' = {_short(value)} is outside its valid range [{lo:g}, {hi:g}]"
        return f"'{name}' = {_short(value)} does not fit the model's float32 input"

    def _category_problem(self, name: str, value: object, allowed: frozenset[str] | None) -> str | None:
        if type(value) is not str:
            return f"'{name}' must be a string, got {_type_name(value)} {_short(value)}"
        if len(value) > MAX_STRING:
            return f"'{name}' is longer than {MAX_STRING} characters"
        if allowed is not None and value not in allowed:
            return (
                f"'{name}' = {_short(value)} is not a known category (one of: {', '.join(sorted(allowed))})"
            )
        return None

    def _key_problem(self, keys: object, where: str) -> str:
        given = set(keys)  # type: ignore[call-overload]
        missing = [n for n in self.feature_names if n not in given]
        extra = sorted(str(k) for k in given - self._names - self._windows)
        parts = []
        if missing:
            parts.append(f"missing feature(s) {', '.join(missing)}")
        if extra:
            parts.append(f"unknown feature(s) {', '.join(extra)}")
        return f"{where}: {'; '.join(parts)}"

    def features(self, obj: object, where: str = "features") -> dict[str, float | str]:
        """One row's features, validated; ints become floats. ``where`` prefixes messages."""
        if type(obj) is not dict:
            raise InvalidRequest(
                f"{where} must be an object mapping feature names to values, got {_type_name(obj)}"
            )
        if len(obj) != len(self._names) or obj.keys() != self._names:
            extra = obj.keys() - self._names
            if not extra or not extra <= self._windows or not self._names <= obj.keys():
                raise InvalidRequest(self._key_problem(obj.keys(), where))
            for name in extra:
                v = obj[name]
                if type(v) is int or type(v) is float:
                    v = float(v)
                    if -FLOAT32_MAX <= v <= FLOAT32_MAX:
                        obj[name] = v
                        continue
                raise InvalidRequest(f"{where}: {self._number_problem(name, v, -FLOAT32_MAX, FLOAT32_MAX)}")
        for name, lo, hi in self._numeric:
            v = obj[name]
            t = type(v)
            if t is float:
                if lo <= v <= hi:  # False for NaN
                    continue
            elif t is int and lo <= v <= hi:
                obj[name] = float(v)
                continue
            raise InvalidRequest(f"{where}: {self._number_problem(name, v, lo, hi)}")
        for name, allowed in self._categorical:
            v = obj[name]
            if type(v) is str and len(v) <= MAX_STRING and (allowed is None or v in allowed):
                continue
            raise InvalidRequest(f"{where}: {self._category_problem(name, v, allowed)}")
        return obj

    # ----------------------------------------------------------------- /predict

    def _record(self, obj: object, where: str) -> Record:
        if type(obj) is not dict:
            raise InvalidRequest(f"{where} must be an object, got {_type_name(obj)}")
        if "features" not in obj:
            raise InvalidRequest(f"{where}: missing field 'features'")
        if len(obj) > 1 and not obj.keys() <= RECORD_FIELDS:
            _unknown(obj.keys(), RECORD_FIELDS, where)
        ts = obj.get("ts")
        if ts is not None and type(ts) is not str:
            raise InvalidRequest(f"{where}: ts must be a string, got {_type_name(ts)}")
        at = f"{where}.features" if where != "body" else "features"
        feats = obj["features"]
        entity = when = None
        online = self.online
        if online is not None and type(feats) is dict:
            if online.entity_column in feats:
                entity = entity_id(feats.pop(online.entity_column), f"{at}.{online.entity_column}")
            if online.timestamp_column in feats:
                when = event_time_ns(feats.pop(online.timestamp_column), f"{at}.{online.timestamp_column}")
        entity_key = _identifier(obj.get("entity_key"), f"{where}.entity_key", MAX_STRING)
        return Record(
            features=self.features(feats, at),
            request_id=_identifier(obj.get("request_id"), f"{where}.request_id"),
            entity_key=entity if entity_key is None else entity_key,
            entity=entity,
            ts_ns=when,
        )

    def _count(self, n: int, what: str) -> None:
        if n == 0:
            raise InvalidRequest(f"{what} is empty")
        if n > self.max_rows:
            raise InvalidRequest(f"{n} {what} exceed the limit of {self.max_rows} per request", 413)

    def predict(self, body: object) -> list[Record]:
        """The records of a ``/predict`` body: one record, or ``{"records": [...]}``."""
        if type(body) is not dict:
            raise InvalidRequest(
                f'body must be a JSON object (one record, or {{"records": [...]}}), got {_type_name(body)}',
                400,
            )
        if "records" in body:
            if len(body) != 1:
                _unknown(body.keys(), frozenset({"records"}), "body")
            records = body["records"]
            if type(records) is not list:
                raise InvalidRequest(f"records must be an array of records, got {_type_name(records)}", 400)
            self._count(len(records), "records")
            out = [self._record(r, f"records[{i}]") for i, r in enumerate(records)]
            ids = [r.request_id for r in out if r.request_id is not None]
            if len(ids) != len(set(ids)):
                raise InvalidRequest("records: request_id values must be unique within a request")
            return out
        return [self._record(body, "body")]

    # ----------------------------------------------------------------- /feedback

    def feedback(self, body: object) -> list[tuple[str, int]]:
        """(request_id, label) pairs of a ``/feedback`` body: one, or ``{"feedback": [...]}``."""
        if type(body) is not dict:
            raise InvalidRequest(f"body must be a JSON object, got {_type_name(body)}", 400)
        items: list[object]
        if "feedback" in body:
            if len(body) != 1:
                _unknown(body.keys(), frozenset({"feedback"}), "body")
            if type(body["feedback"]) is not list:
                raise InvalidRequest(f"feedback must be an array, got {_type_name(body['feedback'])}", 400)
            items = body["feedback"]
            if not items:  # labels are small: only the body size limits how many come at once
                raise InvalidRequest("feedback is empty")
        else:
            items = [body]
        out = []
        for i, item in enumerate(items):
            where = f"feedback[{i}]" if "feedback" in body else "body"
            if type(item) is not dict:
                raise InvalidRequest(f"{where} must be an object, got {_type_name(item)}")
            _unknown(item.keys(), FEEDBACK_FIELDS, where)
            rid = _identifier(item.get("request_id"), f"{where}.request_id", MAX_ISSUED_ID)
            if rid is None:
                raise InvalidRequest(f"{where}: missing field 'request_id'")
            label = item.get("label")
            if type(label) is not int or label not in self._labels:
                allowed = ", ".join(str(v) for v in sorted(self._labels))
                raise InvalidRequest(f"{where}: label must be one of {allowed}, got {_short(label)}")
            out.append((rid, label))
        return out

    # ----------------------------------------------------------------- OIP v2

    def v2_infer(self, body: object, outputs: Sequence[str], binary: bytes | None = None) -> V2Request:
        """A validated OIP v2 inference request against the model's inputs and ``outputs``.

        ``binary`` is the tensor data after the JSON header when the request uses the binary
        tensor data extension (``split_binary``), None when the body was JSON only.
        """
        if type(body) is not dict:
            raise InvalidRequest(f"body must be a JSON object, got {_type_name(body)}", 400)
        _unknown(body.keys(), V2_REQUEST_FIELDS, "request")
        inputs = body.get("inputs")
        if type(inputs) is not list or not inputs:
            raise InvalidRequest("'inputs' must be a non-empty array of tensors", 400)
        request_id = _identifier(body.get("id"), "id")
        params = body.get("parameters")
        entity_key = None
        binary_default = False
        if params is not None:
            if type(params) is not dict:
                raise InvalidRequest(f"parameters must be an object, got {_type_name(params)}", 400)
            entity_key = _identifier(params.get("entity_key"), "parameters.entity_key", MAX_STRING)
            binary_default = _flag(params, "binary_data_output", "parameters")
        rows: int | None = None
        columns: dict[str, list[Any]] = {}
        reader = _BinaryReader(binary)
        for i, tensor in enumerate(inputs):
            name, n, values = self._tensor(tensor, i, reader)
            if name in columns:
                raise InvalidRequest(f"input '{name}' is given twice", 400)
            if rows is not None and n != rows:
                raise InvalidRequest(f"input '{name}' has {n} rows, the first input has {rows}", 400)
            rows = n
            columns[name] = values
        reader.finish()
        if not self._names <= columns.keys():
            raise InvalidRequest(
                self._key_problem(columns.keys(), "inputs").replace("feature(s)", "input tensor(s)"), 400
            )
        assert rows is not None
        self._count(rows, "rows")
        entities = times = None
        if self.online is not None:
            ent_col, ts_col = self.online.entity_column, self.online.timestamp_column
            if ent_col in columns:
                entities = tuple(
                    entity_id(v, f"input '{ent_col}' (row {j})") for j, v in enumerate(columns.pop(ent_col))
                )
            if ts_col in columns:
                times = tuple(
                    event_time_ns(v, f"input '{ts_col}' (row {j})") for j, v in enumerate(columns.pop(ts_col))
                )
            for name in columns.keys() & self._windows:
                for j, v in enumerate(columns[name]):
                    if not (type(v) is float or type(v) is int) or not -FLOAT32_MAX <= v <= FLOAT32_MAX:
                        problem = self._number_problem(name, v, -FLOAT32_MAX, FLOAT32_MAX)
                        raise InvalidRequest(f"input {problem} (row {j})")
        self._check_columns(columns, rows)
        wanted, binary_outputs = self._outputs(body.get("outputs"), outputs, binary_default)
        return V2Request(
            rows=rows,
            columns=columns,
            id=request_id,
            entity_key=entity_key if entity_key is not None or entities is None else entities[0],
            outputs=wanted,
            binary_outputs=binary_outputs,
            entities=entities,
            times_ns=times,
        )

    def _tensor(self, tensor: object, i: int, reader: _BinaryReader) -> tuple[str, int, list[Any]]:
        if type(tensor) is not dict:
            raise InvalidRequest(f"inputs[{i}] must be a tensor object, got {_type_name(tensor)}", 400)
        _unknown(tensor.keys(), V2_INPUT_FIELDS, f"inputs[{i}]")
        name = tensor.get("name")
        if type(name) is not str:
            raise InvalidRequest(f"inputs[{i}].name must be a string", 400)
        if name not in self._specs:
            raise InvalidRequest(f"input '{_short(name)[1:-1]}' is not an input of the model", 400)
        want = self._specs[name]
        datatype = tensor.get("datatype")
        if datatype != want:
            raise InvalidRequest(f"input '{name}' has datatype {_short(datatype)}, expected {want}", 400)
        shape = tensor.get("shape")
        if type(shape) is list:  # JSON Schema counts 2.0 as an integer; so do we
            shape = [int(d) if type(d) is float and d.is_integer() and abs(d) < 2**53 else d for d in shape]
        if (
            type(shape) is not list
            or len(shape) != 2
            or any(type(d) is not int for d in shape)
            or shape[1] != 1
            or shape[0] < 1
        ):
            raise InvalidRequest(
                f"input '{name}' has shape {_short(shape)}, expected [N, 1] with N >= 1", 400
            )
        n = shape[0]
        if n > self.max_rows:
            raise InvalidRequest(
                f"input '{name}' has {n} rows, the limit is {self.max_rows} per request", 413
            )
        params = tensor.get("parameters")
        if params is not None and type(params) is not dict:
            raise InvalidRequest(f"input '{name}': parameters must be an object", 400)
        if params and params.get("binary_data_size") is not None:
            if "data" in tensor:
                raise InvalidRequest(
                    f"input '{name}' has both data and parameters.binary_data_size; send one", 400
                )
            raw = reader.take(name, params["binary_data_size"])
            return name, n, _decode(name, datatype, raw, n)
        data = tensor.get("data")
        if type(data) is not list:
            raise InvalidRequest(f"input '{name}': data must be an array, got {_type_name(data)}", 400)
        if data and type(data[0]) is list:  # nested [[v], [v], ...]
            flat: list[Any] = []
            for row in data:
                if type(row) is not list:
                    raise InvalidRequest(f"input '{name}': data mixes nested and flat values", 400)
                flat.extend(row)
            data = flat
        if len(data) != n:
            raise InvalidRequest(f"input '{name}' has {len(data)} values, shape {shape} needs {n}", 400)
        return name, n, data

    def _check_columns(self, columns: Mapping[str, list[Any]], rows: int) -> None:
        for name, lo, hi in self._numeric:
            values = columns[name]
            for j, v in enumerate(values):
                t = type(v)
                if (t is float or t is int) and lo <= v <= hi:
                    continue
                raise InvalidRequest(f"input {self._number_problem(name, v, lo, hi)} (row {j})")
        for name, allowed in self._categorical:
            for j, v in enumerate(columns[name]):
                problem = self._category_problem(name, v, allowed)
                if problem:
                    raise InvalidRequest(f"input {problem} (row {j})")

    @staticmethod
    def _outputs(
        requested: object, available: Sequence[str], binary_default: bool
    ) -> tuple[tuple[str, ...], frozenset[str]]:
        if requested is None:
            return tuple(available), frozenset(available) if binary_default else frozenset()
        if type(requested) is not list:
            raise InvalidRequest(f"outputs must be an array, got {_type_name(requested)}", 400)
        names, binary = [], set()
        for i, out in enumerate(requested):
            if type(out) is not dict or type(out.get("name")) is not str:
                raise InvalidRequest(f"outputs[{i}] must be an object with a name", 400)
            if out["name"] not in available:
                raise InvalidRequest(
                    f"output '{_short(out['name'])[1:-1]}' is not an output of the model (outputs: {', '.join(available)})",
                    400,
                )
            params = out.get("parameters")
            if params is not None and type(params) is not dict:
                raise InvalidRequest(f"outputs[{i}].parameters must be an object", 400)
            flag = _flag(params, "binary_data", f"outputs[{i}].parameters") if params else None
            if flag or (flag is None and binary_default):
                binary.add(out["name"])
            names.append(out["name"])
        if not names:
            return tuple(available), frozenset(available) if binary_default else frozenset()
        return tuple(dict.fromkeys(names)), frozenset(binary)


def _flag(params: dict, key: str, where: str) -> bool | None:
    value = params.get(key)
    if value is not None and type(value) is not bool:
        raise InvalidRequest(f"{where}.{key} must be true or false, got {_short(value)}", 400)
    return value


class _BinaryReader:
    """Hands out the binary tensor data after the JSON header, tensor by tensor, in order."""

    __slots__ = ("data", "offset")

    def __init__(self, data: bytes | None) -> None:
        self.data = data
        self.offset = 0

    def take(self, name: str, size: object) -> bytes:
        if self.data is None:
            raise InvalidRequest(
                f"input '{name}' has parameters.binary_data_size but the request has no "
                "Inference-Header-Content-Length header",
                400,
            )
        if type(size) is not int or size < 0:
            raise InvalidRequest(
                f"input '{name}': parameters.binary_data_size must be a byte count, got {_short(size)}", 400
            )
        end = self.offset + size
        if end > len(self.data):
            raise InvalidRequest(
                f"input '{name}': binary data ends at byte {end} past the JSON header, but only "
                f"{len(self.data)} bytes follow it",
                400,
            )
        raw = self.data[self.offset : end]
        self.offset = end
        return raw

    def finish(self) -> None:
        if self.data is not None and self.offset != len(self.data):
            raise InvalidRequest(
                f"{len(self.data)} bytes of binary data follow the JSON header, but the inputs' "
                f"binary_data_size add up to {self.offset}",
                400,
            )


def _decode(name: str, datatype: str, raw: bytes, n: int) -> list[Any]:
    """The ``n`` values of one tensor's binary data (row-major), or a 400 naming what is wrong."""
    if datatype == NUMERIC_DATATYPE:
        if len(raw) != 4 * n:
            raise InvalidRequest(
                f"input '{name}': {len(raw)} bytes of FP32 data, shape [{n}, 1] needs {4 * n}", 400
            )
        values = array("f", raw)
        if sys.byteorder == "big":
            values.byteswap()
        return values.tolist()
    out: list[str] = []
    offset = 0
    while offset < len(raw):
        if len(out) == n:
            raise InvalidRequest(
                f"input '{name}': BYTES data holds more than the {n} elements of shape [{n}, 1]", 400
            )
        if offset + 4 > len(raw):
            raise InvalidRequest(f"input '{name}': BYTES element {len(out)} has a truncated length", 400)
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidRequest(
                f"input '{name}': BYTES element {len(out)} of {length} bytes runs past its binary_data_size",
                400,
            )
        try:
            out.append(raw[offset : offset + length].decode())
        except UnicodeDecodeError:
            raise InvalidRequest(f"input '{name}': BYTES element {len(out)} is not UTF-8 text", 400) from None
        offset += length
    if len(out) != n:
        raise InvalidRequest(f"input '{name}' has {len(out)} BYTES elements, shape [{n}, 1] needs {n}", 400)
    return out
