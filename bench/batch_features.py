"""Batch scoring's window-feature step against scoring itself, on the same rows.

    .venv/bin/python bench/batch_features.py --rows 200000 --history 200000 --rounds 3

A logistic regression trained on the window features of ``configs/features.yaml`` scores
``--rows`` generated transactions of one day; ``--history`` transactions of the day before
are the feature history. Per round it times (a) ``batch_features`` (the step batch scoring
runs on the driver before partitioning) and (b) ONNX Runtime scoring the same rows, feeds
included, and prints both and the ratio a/b.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from pathlib import Path

import pyarrow as pa

from mlops import modeling, training
from mlops.datagen import generate
from mlops.features import FeatureSet, batch_features, model_schema
from mlops.onnx_model import OnnxScorer
from mlops.scoring import column_arrays
from mlops.settings import LogisticRegressionSpec, load_settings

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "features.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--history", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    settings = load_settings(CONFIG, environ={})
    fs = FeatureSet.from_settings(settings)
    schema = model_schema(settings.dataset, fs)
    train = training.training_frame(generate(3000, seed=3), fs, "bench")
    scorer = OnnxScorer(
        modeling.to_onnx_bytes(modeling.fit(LogisticRegressionSpec(max_iter=300), train, schema, 0), schema),
        schema,
    )
    history = pa.Table.from_pandas(
        generate(args.history, seed=1, start=datetime(2026, 1, 1)), preserve_index=False
    )
    rows = pa.Table.from_pandas(generate(args.rows, seed=2, start=datetime(2026, 1, 2)), preserve_index=False)
    for r in range(args.rounds):
        t = time.perf_counter()
        table = batch_features([fs], rows, history)
        features_s = time.perf_counter() - t
        t = time.perf_counter()
        scorer.run(scorer.feeds(column_arrays(table, schema.feature_names)))
        scoring_s = time.perf_counter() - t
        print(
            f"round {r}: window features {features_s:.3f} s, scoring {scoring_s:.3f} s, "
            f"ratio {features_s / scoring_s:.2f} ({args.rows:,} rows, {args.history:,} history events)"
        )


if __name__ == "__main__":
    main()
