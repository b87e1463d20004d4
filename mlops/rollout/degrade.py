"""Deliberately degraded models, for rollout demos and tests against the REAL service.

The traffic simulator's pathologies (``simulator.Pathology``) describe what is wrong with a
candidate; on a live service they have to be real. ``degrade`` rewrites a fraud model's
ONNX graph (same inputs, same ``probabilities`` output) so that the served model itself is:

- less accurate: logit noise drawn deterministically from the request's features
  (``extra_noise``, the standard deviation in logit units),
- drifted: a logit shift of every score (``score_shift``),
- slower: an ONNX ``Loop`` spinning for about ``extra_latency_ms`` per call (calibrated on
  this machine when the model is built),
- erroring: a non-finite score on a fixed ``error_share`` of inputs, which the service
  answers with a 5xx (``ModelFailed``) for that request only.

Nothing in serving/ changes: the degraded model is registered as a version like any other.
Pure (onnx graph building); calibrating the spin uses onnxruntime.
"""

from __future__ import annotations

import math
import time

import numpy as np

from mlops.onnx_model import PROBA_OUTPUT
from mlops.rollout.simulator import Pathology
from mlops.settings import DatasetSchema

_ORIG = "probabilities_undegraded"


def _uniform(h, name: str, a: str, b: str, ka: float, kb: float, offset: float) -> list:
    """Nodes computing ``frac(a*ka + b*kb + offset)``: a pseudo-uniform number per input."""
    return [
        h.make_node("Mul", [a, f"{name}_ka"], [f"{name}_a"]),
        h.make_node("Mul", [b, f"{name}_kb"], [f"{name}_b"]),
        h.make_node("Add", [f"{name}_a", f"{name}_b"], [f"{name}_ab"]),
        h.make_node("Add", [f"{name}_ab", f"{name}_off"], [f"{name}_x"]),
        h.make_node("Floor", [f"{name}_x"], [f"{name}_fl"]),
        h.make_node("Sub", [f"{name}_x", f"{name}_fl"], [name]),
    ], [
        h.make_tensor(f"{name}_ka", 1, [], [ka]),
        h.make_tensor(f"{name}_kb", 1, [], [kb]),
        h.make_tensor(f"{name}_off", 1, [], [offset]),
    ]


def spin_body():
    """The body of an ONNX ``Loop`` that only counts (``acc += 1`` per trip): run for a trip
    count taken from the input, it costs CPU time without changing any output."""
    from onnx import TensorProto as T
    from onnx import helper as h

    return h.make_graph(
        [
            h.make_node("Identity", ["cond_in"], ["cond_out"]),
            h.make_node("Add", ["acc_in", "one"], ["acc_out"]),
        ],
        "spin",
        [
            h.make_tensor_value_info("i", T.INT64, []),
            h.make_tensor_value_info("cond_in", T.BOOL, []),
            h.make_tensor_value_info("acc_in", T.FLOAT, []),
        ],
        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("acc_out", T.FLOAT, [])],
        [h.make_tensor("one", T.FLOAT, [], [1.0])],
    )


def _build(onnx_model: bytes, schema: DatasetSchema, p: Pathology, spin_steps: int) -> bytes:
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h

    model = onnx.load_from_string(onnx_model)
    g = model.graph
    for node in g.node:
        node.output[:] = [_ORIG if o == PROBA_OUTPUT else o for o in node.output]
    keep = [o for o in g.output if o.name != PROBA_OUTPUT]
    del g.output[:]
    g.output.extend(keep)
    num = schema.numeric_names
    a, b, c = num[0], num[min(8, len(num) - 1)], num[min(10, len(num) - 1)]
    nodes, inits = [], []
    n1, i1 = _uniform(h, "_u_err", a, b, 97.31, 13.7, 0.5)
    n2, i2 = _uniform(h, "_u_noise", a, c, 31.7, 7.3, 0.37)
    nodes += n1 + n2
    inits += i1 + i2
    inits += [
        h.make_tensor("_one", T.FLOAT, [], [1.0]),
        h.make_tensor("_eps", T.FLOAT, [], [1e-6]),
        h.make_tensor("_hi", T.FLOAT, [], [1 - 1e-6]),
        h.make_tensor("_half", T.FLOAT, [], [0.5]),
        h.make_tensor("_noise", T.FLOAT, [], [p.extra_noise * math.sqrt(12.0)]),
        h.make_tensor("_shift", T.FLOAT, [], [p.score_shift]),
        h.make_tensor("_share", T.FLOAT, [], [p.error_share]),
        h.make_tensor("_nan", T.FLOAT, [], [math.nan]),
        h.make_tensor("_starts", T.INT64, [1], [1]),
        h.make_tensor("_ends", T.INT64, [1], [2]),
        h.make_tensor("_axes", T.INT64, [1], [1]),
        h.make_tensor("_zero", T.FLOAT, [], [0.0]),
        h.make_tensor("_steps", T.FLOAT, [], [float(spin_steps)]),
        h.make_tensor("_cond", T.BOOL, [], [True]),
    ]
    nodes += [
        h.make_node("Slice", [_ORIG, "_starts", "_ends", "_axes"], ["_p"]),  # [N, 1] fraud probability
        h.make_node("Clip", ["_p", "_eps", "_hi"], ["_pc"]),
        h.make_node("Sub", ["_one", "_pc"], ["_q"]),
        h.make_node("Div", ["_pc", "_q"], ["_odds"]),
        h.make_node("Log", ["_odds"], ["_logit"]),
        h.make_node("Sub", ["_u_noise", "_half"], ["_centred"]),
        h.make_node("Mul", ["_centred", "_noise"], ["_jitter"]),  # uniform, sd = extra_noise
        h.make_node("Add", ["_logit", "_jitter"], ["_l1"]),
        h.make_node("Add", ["_l1", "_shift"], ["_l2"]),
        h.make_node("Sigmoid", ["_l2"], ["_p2"]),
        h.make_node("Less", ["_u_err", "_share"], ["_fail"]),
        h.make_node("Where", ["_fail", "_nan", "_p2"], ["_p3"]),
    ]
    if spin_steps > 0:
        body = spin_body()
        nodes += [
            h.make_node(
                "ReduceMax", [a], ["_top"], keepdims=0
            ),  # depends on the input: never constant-folded
            h.make_node("Mul", ["_top", "_zero"], ["_top0"]),
            h.make_node("Add", ["_top0", "_steps"], ["_trip_f"]),
            h.make_node("Cast", ["_trip_f"], ["_trip"], to=T.INT64),
            h.make_node("Loop", ["_trip", "_cond", "_zero"], ["_spun"], body=body),
            h.make_node("Mul", ["_spun", "_zero"], ["_spun0"]),
            h.make_node("Add", ["_p3", "_spun0"], ["_p4"]),
        ]
        last = "_p4"
    else:
        last = "_p3"
    nodes += [
        h.make_node("Sub", ["_one", last], ["_neg"]),
        h.make_node("Concat", ["_neg", last], [PROBA_OUTPUT], axis=1),
    ]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    g.output.append(h.make_tensor_value_info(PROBA_OUTPUT, T.FLOAT, [None, 2]))
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _time_ms(onnx_model: bytes, schema: DatasetSchema, rows: int = 1, repeats: int = 5) -> float:
    from mlops.datagen import generate
    from mlops.onnx_model import OnnxScorer

    scorer = OnnxScorer(onnx_model, schema)
    frame = generate(50, seed=5).head(rows)
    scorer.predict_proba(frame)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        scorer.predict_proba(frame)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def degrade(onnx_model: bytes, schema: DatasetSchema, pathology: Pathology) -> bytes:
    """``onnx_model`` with ``pathology`` built into its graph (see the module docstring).
    ``latency_factor`` is not supported (a model cannot know the service's latency): give
    ``extra_latency_ms``."""
    if pathology.latency_factor != 1.0:
        raise ValueError("degrade() takes extra_latency_ms, not latency_factor")
    if pathology.extra_latency_ms <= 0:
        return _build(onnx_model, schema, pathology, 0)
    probe_steps = 200_000
    base = _time_ms(_build(onnx_model, schema, pathology, 0), schema)
    spun = _time_ms(_build(onnx_model, schema, pathology, probe_steps), schema)
    per_step = max((spun - base) / probe_steps, 1e-7)
    return _build(onnx_model, schema, pathology, int(pathology.extra_latency_ms / per_step))
