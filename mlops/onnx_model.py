"""Scoring an ONNX model exported by the platform, the same way everywhere.

Training's parity check, batch scoring and online serving all feed the model through
``OnnxScorer``, so the column-to-tensor contract lives in one place: one ``[N, 1]`` input
per feature, named by ``mlops.feature_names.onnx_input_name`` of its column, float32 for
numeric and string for categorical columns, and a ``probabilities`` output of shape
``[N, 2]``. Callers always pass columns by the dataset's own names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import pandas as pd
import pyarrow as pa

from mlops.errors import DataError, ModelError
from mlops.settings import DatasetSchema

PROBA_OUTPUT = "probabilities"


@dataclass(frozen=True)
class TensorSpec:
    """A model input: the feature column it is fed from (the name clients use), its OIP v2
    datatype, shape (None for a free dimension) and the ONNX graph input it feeds."""

    name: str
    datatype: str  # "FP32" or "BYTES" in Open Inference Protocol terms
    shape: tuple[int | None, ...]
    onnx_name: str


def session_options(threads: int = 1) -> ort.SessionOptions:
    """ONNX Runtime options: ``threads`` intra-op threads, full graph optimisation, quiet logs."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


def string_values(values: np.ndarray) -> np.ndarray:
    """An object array of ``str`` for a string tensor: as is when it already holds only
    ``str`` (ONNX Runtime reads object arrays directly; converting to a fixed-width unicode
    array would cost more than scoring a big batch), else every value through ``str``.

    The check collects the values' types with ``map`` (a loop in C) rather than a Python
    generator: half the time on a 500,000-row column, the same answer."""
    if set(map(type, values)) <= {str}:
        return values
    return values.astype(str).astype(object)


class OnnxScorer:
    """An ONNX Runtime session plus the feature contract of the dataset schema."""

    def __init__(self, model: bytes, schema: DatasetSchema, threads: int = 1):
        try:
            self.session = ort.InferenceSession(
                model, session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises bare RuntimeError subclasses
            raise ModelError(f"ONNX model cannot be loaded: {exc}") from exc
        self.schema = schema
        self._numeric = schema.numeric_names
        self._categorical = schema.categorical_names
        self._input_names = schema.input_names
        graph_inputs = {i.name for i in self.session.get_inputs()}
        missing = [c for c, n in self._input_names.items() if n not in graph_inputs]
        if missing:
            listed = ", ".join(
                f"{c} (input {self._input_names[c]})" if c != self._input_names[c] else c for c in missing
            )
            raise ModelError(f"ONNX model lacks inputs for features: {listed}")
        outputs = [o.name for o in self.session.get_outputs()]
        if PROBA_OUTPUT not in outputs:
            raise ModelError(f"ONNX model has no '{PROBA_OUTPUT}' output (outputs: {outputs})")

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """The model's inputs in schema order: numeric features, then categorical ones."""
        names = self._input_names
        numeric = tuple(TensorSpec(n, "FP32", (None, 1), names[n]) for n in self._numeric)
        return numeric + tuple(TensorSpec(n, "BYTES", (None, 1), names[n]) for n in self._categorical)

    def feeds(
        self, frame: pd.DataFrame | Mapping[str, object], *, strings_checked: bool = False
    ) -> dict[str, np.ndarray]:
        """The graph's feeds from columns named as in the dataset, keyed by ONNX input name.

        ``strings_checked`` says the categorical columns are object arrays of ``str`` already
        (``mlops.scoring.column_arrays`` makes them so), which skips a pass over every row.
        """
        names = self._input_names
        as_strings = (lambda v: v) if strings_checked else string_values
        try:
            feeds = {names[n]: np.asarray(frame[n], dtype=np.float32).reshape(-1, 1) for n in self._numeric}
            for n in self._categorical:
                feeds[names[n]] = as_strings(np.asarray(frame[n], dtype=object)).reshape(-1, 1)
        except KeyError as exc:
            raise DataError(f"missing feature column {exc}") from None
        except (TypeError, ValueError) as exc:
            raise DataError(f"feature columns cannot be converted: {exc}") from None
        return feeds

    def run(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """Fraud probabilities for prepared feeds."""
        return self.session.run([PROBA_OUTPUT], dict(feeds))[0][:, 1]

    def predict_proba(self, frame: pd.DataFrame | Mapping[str, object]) -> np.ndarray:
        """Fraud probability of each row."""
        return self.run(self.feeds(frame))


# --------------------------------------------------------------------------- category codes

_ML_DOMAIN = "ai.onnx.ml"


def category_code_model(model: bytes) -> tuple[bytes, dict[str, tuple[str, ...]]] | None:
    """``model`` with its string inputs taken as int64 category codes, and each such
    input's categories; None when the graph does not allow it.

    A string input qualifies when its only consumer is a ``OneHotEncoder`` over
    ``cats_strings`` (what the platform's pipelines export). That encoder is given the
    categories' positions ``0..k-1`` instead, so a row fed the position of its value (or
    ``-1`` for a value outside the list) is encoded exactly as the string was: same
    one-hot columns, same ``zeros`` rule for unknown values. ONNX Runtime then reads
    an integer array instead of converting one Python string per row and input.
    """
    import onnx

    proto = onnx.load_from_string(model)
    graph = proto.graph
    strings = {i.name for i in graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.STRING}
    if not strings or strings & {o.name for o in graph.output}:
        return None
    consumers: dict[str, list[onnx.NodeProto]] = {name: [] for name in strings}
    for node in graph.node:
        for name in node.input:
            if name in consumers:
                consumers[name].append(node)
        for attr in node.attribute:  # a subgraph could read an input without naming it
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                return None
    categories: dict[str, tuple[str, ...]] = {}
    for name, nodes in consumers.items():
        if len(nodes) != 1 or nodes[0].op_type != "OneHotEncoder" or nodes[0].domain != _ML_DOMAIN:
            return None
        attrs = {a.name: a for a in nodes[0].attribute}
        if "cats_strings" not in attrs or "cats_int64s" in attrs:
            return None
        try:
            categories[name] = tuple(s.decode("utf-8") for s in attrs["cats_strings"].strings)
        except UnicodeDecodeError:
            return None
    for name, nodes in consumers.items():
        node = nodes[0]
        kept = [a for a in node.attribute if a.name != "cats_strings"]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.append(onnx.helper.make_attribute("cats_int64s", list(range(len(categories[name])))))
    for graph_input in graph.input:
        if graph_input.name in strings:
            graph_input.type.tensor_type.elem_type = onnx.TensorProto.INT64
    return proto.SerializeToString(), categories


ESTIMATOR_OPS = frozenset(
    {"TreeEnsembleClassifier", "TreeEnsembleRegressor", "LinearClassifier", "LinearRegressor"}
)
"""ONNX-ML operators that hold a model's learned weights: where ``estimator_split`` cuts."""


def estimator_split(model: bytes) -> tuple[bytes, bytes, str] | None:
    """``model`` cut in two before its estimator node (``ESTIMATOR_OPS``): (prefix ONNX,
    head ONNX, cut tensor). The prefix maps the graph inputs to the estimator's input (the
    preprocessing); the head maps that tensor to the graph outputs (the estimator and what
    follows it). Running the head on the prefix's output computes exactly what the whole
    graph computes. None when the graph has not that shape: not exactly one estimator node
    with one float input, a graph output not computed from it, or a node after the
    estimator that reads anything else (an initializer, a graph input, a subgraph)."""
    import onnx
    from onnx import helper

    proto = onnx.load_from_string(model)
    graph = proto.graph
    estimators = [n for n in graph.node if n.op_type in ESTIMATOR_OPS and n.domain == _ML_DOMAIN]
    if len(estimators) != 1 or len(estimators[0].input) != 1:
        return None
    cut = estimators[0].input[0]
    head_names = set(estimators[0].output)
    head: list[onnx.NodeProto] = []
    prefix: list[onnx.NodeProto] = []
    for node in graph.node:  # topologically sorted, as ONNX requires
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        if node is estimators[0] or any(name in head_names for name in node.input):
            if node is not estimators[0] and not all(name in head_names for name in node.input if name):
                return None
            head.append(node)
            head_names.update(node.output)
        else:
            prefix.append(node)
    if not all(o.name in head_names for o in graph.output) or cut in {i.name for i in graph.input}:
        return None

    def model_of(name: str, nodes, inputs, outputs, initializers) -> bytes:
        sub = helper.make_model(
            helper.make_graph(nodes, name, inputs, outputs, initializers),
            opset_imports=proto.opset_import,
            ir_version=proto.ir_version,
        )
        return sub.SerializeToString()

    cut_tensor = helper.make_tensor_value_info(cut, onnx.TensorProto.FLOAT, None)
    prefix_onnx = model_of("prefix", prefix, list(graph.input), [cut_tensor], list(graph.initializer))
    try:  # ONNX Runtime infers the cut's type where onnx's shape inference does not (ai.onnx.ml)
        session = ort.InferenceSession(prefix_onnx, session_options(1), providers=["CPUExecutionProvider"])
    except Exception:  # the cut tensor is not float: not cut
        return None
    if session.get_outputs()[0].type != "tensor(float)":
        return None
    return prefix_onnx, model_of("head", head, [cut_tensor], list(graph.output), []), cut


class CodedScorer(OnnxScorer):
    """An ``OnnxScorer`` that scores Arrow tables with the categorical features fed as
    integer category codes (``category_code_model``), straight from the columns'
    dictionaries: each distinct value is looked up once per chunk, rows are integer
    indices. Scores equal the string graph's bit for bit. A model whose graph does not
    allow codes, or a table whose categorical column is not a string column, is scored
    with string feeds as ``OnnxScorer`` does.
    """

    def __init__(self, model: bytes, schema: DatasetSchema, threads: int = 1):
        super().__init__(model, schema, threads)
        coded = category_code_model(model)
        self.coded_session: ort.InferenceSession | None = None
        self.categories: dict[str, tuple[str, ...]] = {}
        if coded is not None and set(coded[1]) == {self._input_names[c] for c in self._categorical}:
            self.coded_session = ort.InferenceSession(
                coded[0], session_options(threads), providers=["CPUExecutionProvider"]
            )
            self.categories = coded[1]

    def table_feeds(self, table: pa.Table) -> dict[str, np.ndarray]:
        """Feeds for ``run_table``: codes for every categorical column when the graph takes
        codes and each of those columns holds strings (plain or dictionary-encoded), else
        the string feeds of ``OnnxScorer.feeds``. Missing columns raise ``DataError``."""
        from mlops.scoring import column_arrays

        names = self._input_names
        coded = self.coded_session is not None and all(
            n in table.column_names and _string_like(table.schema.field(n).type) for n in self._categorical
        )
        if not coded:
            return self.feeds(column_arrays(table, self.schema.feature_names), strings_checked=True)
        numeric = column_arrays(table, self._numeric)
        try:
            feeds = {names[n]: np.asarray(numeric[n], dtype=np.float32).reshape(-1, 1) for n in self._numeric}
        except KeyError as exc:
            raise DataError(f"missing feature column {exc}") from None
        except (TypeError, ValueError) as exc:
            raise DataError(f"feature columns cannot be converted: {exc}") from None
        for n in self._categorical:
            feeds[names[n]] = _codes(table.column(n), self.categories[names[n]]).reshape(-1, 1)
        return feeds

    def run_table(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """Fraud probabilities for feeds from ``table_feeds``."""
        coded = any(v.dtype == np.int64 for k, v in feeds.items() if k in self.categories)
        session = self.coded_session if coded else self.session
        return session.run([PROBA_OUTPUT], dict(feeds))[0][:, 1]


def _string_like(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _codes(column: pa.ChunkedArray, categories: tuple[str, ...]) -> np.ndarray:
    """Each row's position in ``categories`` (-1 for a value outside them).

    A null is coded as the string feeds have it: they turn a null into the text ``"None"``.
    """
    position = {value: i for i, value in enumerate(categories)}
    null_code = position.get("None", -1)
    out = np.empty(len(column), dtype=np.int64)
    at = 0
    for chunk in column.chunks:
        n = len(chunk)
        if not n:
            continue
        if not pa.types.is_dictionary(chunk.type):
            chunk = chunk.dictionary_encode()
        # One slot per dictionary value, plus a last one for null rows.
        lookup = np.array(
            [null_code if v is None else position.get(v, -1) for v in chunk.dictionary.to_pylist()]
            + [null_code],
            dtype=np.int64,
        )
        indices = chunk.indices
        if indices.null_count:
            indices = indices.fill_null(len(chunk.dictionary))
        out[at : at + n] = lookup[indices.to_numpy()]
        at += n
    return out
