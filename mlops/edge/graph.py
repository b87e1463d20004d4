"""ONNX graph utilities for edge variants: optimise, compact, check and describe a model.

``optimize`` runs ONNX Runtime's graph optimiser offline at a *portable* level (``basic``
or ``extended``; ``all`` adds hardware-specific layout transforms that ONNX Runtime itself
warns must not leave the machine) and saves the result; ``compact`` then renames internal
tensors and nodes to short names and drops doc strings, keeping the graph's inputs and
outputs (the feature contract) untouched. Dense layers (``MatMul``/``Gemm`` with a constant
weight) are named ``dense0``, ``dense1``, ... in graph order, so a budget can name a layer
to keep in float (``exclude_nodes``) and a report can say which one was.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from mlops.errors import ModelError
from mlops.onnx_model import PROBA_OUTPUT

DENSE_OPS = frozenset({"MatMul", "Gemm"})
TREE_OPS = frozenset({"TreeEnsembleClassifier", "TreeEnsembleRegressor", "TreeEnsemble"})
LINEAR_OPS = frozenset({"LinearClassifier", "LinearRegressor", "SVMClassifier", "SVMRegressor"})
QUANTIZED_OPS = frozenset(
    {"MatMulInteger", "QLinearMatMul", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear"}
)

_LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}


def load(model: bytes) -> onnx.ModelProto:
    """The parsed model; ``ModelError`` when the bytes are not ONNX."""
    try:
        return onnx.load_from_string(model)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelError(f"not an ONNX model: {exc}") from exc


def check(model: bytes) -> None:
    """``onnx.checker`` with full checks; raises ``ModelError`` naming the problem."""
    try:
        onnx.checker.check_model(load(model), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"ONNX checker: {str(exc).splitlines()[0]}") from exc
    except onnx.shape_inference.InferenceError as exc:
        raise ModelError(f"ONNX shape inference: {str(exc).splitlines()[0]}") from exc


def optimize(model: bytes, level: str = "basic") -> bytes:
    """The model as ONNX Runtime's offline optimiser saves it at a portable ``level``."""
    if level not in _LEVELS:
        raise ModelError(f"optimisation level '{level}' is not portable (use basic or extended)")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = _LEVELS[level]
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        opts.optimized_model_filepath = str(out)
        try:
            ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises bare RuntimeError subclasses
            raise ModelError(f"ONNX Runtime cannot optimise the model: {exc}") from exc
        return out.read_bytes()


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    return {i.name for i in graph.initializer}


def compact(model: bytes, rename_nodes: bool = True) -> bytes:
    """Short internal names, no doc strings; inputs, outputs and computation unchanged.

    ``rename_nodes=False`` keeps node names (a quantized graph keeps ``dense<k>`` for the
    layers left in float, so reports and ``exclude_nodes`` still match).
    """
    m = load(model)
    g = m.graph
    keep = {i.name for i in g.input} | {o.name for o in g.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            names[name] = f"t{len(names)}"
        return names[name]

    constants = _constant_names(g)
    dense = 0
    for i, node in enumerate(g.node):
        if not rename_nodes:
            pass
        elif node.op_type in DENSE_OPS and any(x in constants for x in node.input[1:2]):
            node.name = f"dense{dense}"
            dense += 1
        else:
            node.name = f"n{i}"
        node.input[:] = [short(x) for x in node.input]
        node.output[:] = [short(x) for x in node.output]
        node.doc_string = ""
    for init in g.initializer:
        init.name = short(init.name)
        init.doc_string = ""
    for vi in g.value_info:  # kept: the quantizer needs types that inference cannot give for ai.onnx.ml ops
        vi.name = short(vi.name)
    m.doc_string = ""
    g.doc_string = ""
    g.name = "edge"
    m.producer_name = "mlops-edge"
    m.producer_version = ""
    return m.SerializeToString()


@dataclass(frozen=True)
class DenseNode:
    """A dense layer: its node name and the shape of its constant weight."""

    name: str
    op_type: str
    weight_shape: tuple[int, ...]

    def describe(self) -> str:
        """``name (op weight-shape)``, e.g. ``dense0 (MatMul 12x16)``."""
        return f"{self.name} ({self.op_type} {'x'.join(map(str, self.weight_shape))})"


def dense_nodes(model: bytes) -> list[DenseNode]:
    """Float dense layers with a constant weight: what INT8 quantization can act on."""
    g = load(model).graph
    inits = {i.name: i for i in g.initializer}
    out = []
    for node in g.node:
        if node.op_type in DENSE_OPS and len(node.input) > 1 and node.input[1] in inits:
            init = inits[node.input[1]]
            if init.data_type == onnx.TensorProto.FLOAT:
                out.append(DenseNode(node.name, node.op_type, tuple(int(d) for d in init.dims)))
    return out


def op_types(model: bytes) -> list[str]:
    """The op type of every node, in graph order."""
    return [n.op_type for n in load(model).graph.node]


def family(model: bytes) -> str:
    """``tree``, ``linear``, ``neural`` (dense layers) or ``other``: what compression can apply."""
    ops = set(op_types(model))
    if ops & TREE_OPS:
        return "tree"
    if ops & LINEAR_OPS:
        return "linear"
    if ops & (DENSE_OPS | QUANTIZED_OPS):
        return "neural"
    return "other"


def weight_shapes(model: bytes) -> list[tuple[int, ...]]:
    """Shapes of the dense layers' weights (float or INT8), in graph order."""
    g = load(model).graph
    inits = {i.name: i for i in g.initializer}
    shapes = []
    for node in g.node:
        if node.op_type in DENSE_OPS | {"MatMulInteger", "QLinearMatMul"}:
            idx = 3 if node.op_type == "QLinearMatMul" else 1
            src = node.input[idx] if len(node.input) > idx else ""
            producer = next((n for n in g.node if src in n.output), None)
            if producer is not None and producer.op_type == "DequantizeLinear":  # QDQ: weight behind DQ
                src = producer.input[0]
            if src in inits:
                shapes.append(tuple(int(d) for d in inits[src].dims))
    return shapes


def parameter_count(model: bytes) -> int:
    """How many weights the dense layers hold (biases not counted)."""
    return int(sum(np.prod(s) for s in weight_shapes(model)))


def with_output_transform(model: bytes, how: str) -> bytes:
    """A copy whose ``probabilities`` pass through one more operation (for rollout drills).

    ``nan``: multiplied by NaN, so the model loads and runs but answers garbage (fails a
    device's health check). ``sqrt``: square-rooted, so it answers plausibly but with a
    shifted distribution (passes the health check, fails the prediction-shift gate).
    """
    m = load(model)
    g = m.graph
    raw = f"{PROBA_OUTPUT}_raw"
    for node in g.node:
        node.output[:] = [raw if o == PROBA_OUTPUT else o for o in node.output]
    if how == "nan":
        g.initializer.append(numpy_helper.from_array(np.array(np.nan, dtype=np.float32), "drill_nan"))
        g.node.append(onnx.helper.make_node("Mul", [raw, "drill_nan"], [PROBA_OUTPUT], name="drill"))
    elif how == "sqrt":
        g.node.append(onnx.helper.make_node("Sqrt", [raw], [PROBA_OUTPUT], name="drill"))
    else:
        raise ValueError(f"unknown drill transform {how!r}")
    return m.SerializeToString()
