"""Promotion gate benchmark: what scoring both versions on the same rows adds to a training run.

One run, in one process, in a temporary MLOPS_HOME with the default config: the training flow
trains v1 (champion) on ``--rows`` generated transactions, then v2 on as many rows of other
data (another seed: a new month). Timed, in this run:
  * the second training run, end to end (its gate included);
  * the same-rows gate of v2 against v1 (download both ONNX models and v2's holdout, verify
    hashes, score both with ONNX Runtime, compute metrics), median of ``--repeats``;
  * the logged-metrics comparison it replaces (both versions' run metrics read from MLflow,
    compared), median of ``--repeats``;
  * within the gate, verifying both versions' signed evaluation records (trusted keys read,
    record downloaded, signature, run and ONNX SHA-256 checked), median of ``--repeats``.
Printed: the four times, gate / training and same-rows / logged ratios, the evaluation set.

    python bench/promotion_gate.py --rows 60000 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-gate-") as tmp:
        os.environ["MLOPS_HOME"] = str(Path(tmp) / "home")
        from adapters.runtime import configure
        from mlops.settings import load_settings

        settings = load_settings()
        configure(settings)  # before Prefect is imported
        from adapters.datasets import write_parquet
        from adapters.evaluation_keys import trusted_keys
        from flows.train import train_flow
        from mlops.datagen import generate
        from mlops.gates import promotion_gate
        from registry.mlflow_registry import ModelRegistry
        from registry.promotion import champion_gate, verified_record_of

        first, second = Path(tmp) / "month1.parquet", Path(tmp) / "month2.parquet"
        write_parquet([generate(args.rows, seed=0)], first)
        write_parquet([generate(args.rows, seed=1)], second)
        train_flow(str(first))
        t0 = time.perf_counter()
        summary = train_flow(str(second))
        training = time.perf_counter() - t0

        registry = ModelRegistry(settings)
        name = settings.training.model_name
        same_rows, logged, records, gate = [], [], [], None
        versions = [registry.version(name, v) for v in (summary.version, 1)]
        models = {v.version: registry.onnx_bytes(name, v.version) for v in versions}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            gate = champion_gate(settings, registry, name, summary.version)
            same_rows.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            cand, champ = registry.version(name, summary.version), registry.version(name, 1)
            promotion_gate(settings.promotion.gates, cand.metrics, champ.metrics)
            logged.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            trusted = trusted_keys(settings)
            for v in versions:
                verified_record_of(registry, v, models[v.version], trusted, f"holdout of v{v.version}")
            records.append(time.perf_counter() - t0)

    g, lg = statistics.median(same_rows), statistics.median(logged)
    print(f"rows per training set: {args.rows}; repeats: {args.repeats}")
    print(f"training run (v2, gate included): {training:.2f} s")
    print(f"same-rows gate (median): {g:.3f} s  [range {min(same_rows):.3f}-{max(same_rows):.3f}]")
    print(f"logged-metrics comparison (median): {lg:.3f} s")
    r = statistics.median(records)
    print(f"signed-record verification of both versions (median): {r:.3f} s  ({r / g:.1%} of the gate)")
    print(f"gate / training run: {g / training:.3f}   same-rows / logged: {g / lg:.1f}x")
    print(f"verdict: {gate.describe() if gate else '-'}")


if __name__ == "__main__":
    main()
