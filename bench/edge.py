"""Edge benchmark: do the compressed variants reach their goals? (A benchmark, not a test.)

    .venv/bin/python bench/edge.py [--rows 60000] [--budget configs/edge/mobile-app.yaml]

Trains the demo champion (gradient boosting on generated card transactions, as `mlops demo`
does), builds every variant of the budget exactly as `mlops edge export` does, and prints:

- INT8 goal: the INT8 variant >= 3.5x smaller than its float network, AUC drop <= 0.005
  against the float teacher, single-row p50 no slower than the float network;
- student goal: the distilled student >= 10x smaller than the teacher, AUC drop within budget;
- what dynamic INT8 does to a tree model and to logistic regression (why those are skipped).

Latency ratios are measured interleaved (float call, INT8 call, float call, ...) on the same
rows, as CPU time of the calling thread, so load from other processes on a shared host
cancels out instead of landing on whichever model ran second.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from mlops import modeling
from mlops.datagen import generate
from mlops.edge import graph
from mlops.edge.budget import load_budget
from mlops.edge.compress import VariantBuilder, prepare_data
from mlops.onnx_model import OnnxScorer
from mlops.settings import GradientBoostingSpec, LogisticRegressionSpec, load_settings


def interleaved_p50(
    a: OnnxScorer, b: OnnxScorer, feeds: dict[str, np.ndarray], calls: int = 2000
) -> tuple[float, float]:
    n = len(next(iter(feeds.values())))
    ta, tb = [], []
    for i in range(calls):
        row = {k: v[i % n : i % n + 1] for k, v in feeds.items()}
        for scorer, out in ((a, ta), (b, tb)) if i % 2 else ((b, tb), (a, ta)):
            t0 = time.thread_time()
            scorer.run(row)
            out.append((time.thread_time() - t0) * 1e3)
    return float(np.median(ta)), float(np.median(tb))


def batch_throughput(scorer: OnnxScorer, feeds: dict[str, np.ndarray]) -> float:
    n = len(next(iter(feeds.values())))
    best = min(_timed(scorer, feeds) for _ in range(5))
    return n / best


def _timed(scorer: OnnxScorer, feeds: dict[str, np.ndarray]) -> float:
    t0 = time.perf_counter()
    scorer.run(feeds)
    return time.perf_counter() - t0


def dynamic_int8_effect(model: bytes) -> str:
    from onnxruntime.quantization import quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        src.write_bytes(model)
        try:
            quantize_dynamic(src, out)
        except Exception as exc:
            return f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        q = out.read_bytes()
    changed = [op for op in graph.op_types(q) if op in graph.QUANTIZED_OPS]
    return f"{len(model):,} B -> {len(q):,} B, quantized ops: {changed or 'none'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--budget", default="configs/edge/mobile-app.yaml")
    args = ap.parse_args()
    settings = load_settings(environ={})
    schema = settings.dataset
    budget = load_budget(args.budget)

    t0 = time.perf_counter()
    frame = generate(args.rows, seed=1)
    train, test = modeling.split(frame, schema, settings.training)
    teacher = modeling.to_onnx_bytes(
        modeling.fit(GradientBoostingSpec(), train, schema, settings.training.seed), schema
    )
    lr = modeling.to_onnx_bytes(
        modeling.fit(LogisticRegressionSpec(), train, schema, settings.training.seed), schema
    )
    print(
        f"teacher: gradient boosting, {len(teacher):,} B (trained in {time.perf_counter() - t0:.0f} s on {len(train):,} rows)"
    )
    print(f"dynamic INT8 on the tree teacher:        {dynamic_int8_effect(teacher)}")
    print(f"dynamic INT8 on logistic regression:     {dynamic_int8_effect(lr)}")

    builder = VariantBuilder(teacher, prepare_data(train, test, schema, budget), schema, budget)
    results = {}
    for spec in budget.variants:
        t1 = time.perf_counter()
        results[spec.name] = r = builder.build(spec)
        m = r.measurement
        figures = (
            (
                f"{m.size_bytes:>9,} B  p50 {m.latency_p50_ms:.3f}  p99 {m.latency_p99_ms:.3f} ms  {m.metric} {m.value:.4f} "
                f"drop {m.drop:+.4f}  max|dp| {m.max_abs_dp:.4f}  mean|dp| {m.mean_abs_dp:.5f}"
            )
            if m
            else r.reason[:90]
        )
        print(f"  {r.name:26s} {r.outcome:8s} {figures}  ({time.perf_counter() - t1:.1f} s)")

    feeds = OnnxScorer(teacher, schema).feeds(builder.data.eval.iloc[:5000])
    print(
        "\nINT8 goal: >= 3.5x smaller than its float network, AUC drop <= 0.005 vs the float teacher, p50 no slower"
    )
    for name, r in results.items():
        if r.kind != "quantize" or r.measurement is None:
            continue
        f_bytes, q_bytes = builder.model(r.source), builder.model(name)
        fs, qs = OnnxScorer(f_bytes, schema), OnnxScorer(q_bytes, schema)
        f50, q50 = interleaved_p50(fs, qs, feeds)
        ratio = len(f_bytes) / len(q_bytes)
        thr = batch_throughput(qs, feeds) / batch_throughput(fs, feeds)
        ok = ratio >= 3.5 and r.measurement.drop <= 0.005 and q50 <= f50 * 1.0
        print(
            f"  {name:26s} {ratio:4.2f}x smaller than {r.source} ({len(teacher) / len(q_bytes):4.1f}x vs teacher), "
            f"drop {r.measurement.drop:+.4f}, p50 {q50:.3f} vs {f50:.3f} ms ({q50 / f50:.2f}x), batch {thr:.2f}x, "
            f"max|dp| {r.measurement.max_abs_dp:.3f}, gate {r.outcome}  -> {'GOAL MET' if ok else 'goal missed'}"
        )

    print(f"\nstudent goal: >= 10x smaller than the teacher, AUC drop <= {budget.limits.max_metric_drop}")
    for name, r in results.items():
        spec = budget.spec(name)
        if r.kind == "distill" and r.measurement is not None and getattr(spec, "compression", 0) >= 10:
            m = r.measurement
            ratio = len(teacher) / m.size_bytes
            ok = ratio >= 10 and m.drop <= budget.limits.max_metric_drop
            print(
                f"  {name:26s} {ratio:5.1f}x smaller ({m.size_bytes:,} B), drop {m.drop:+.4f}  -> {'GOAL MET' if ok else 'goal missed'}"
            )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
