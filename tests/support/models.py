"""A ready-made ONNX model logged as an MLflow run (fixtures and benchmarks that need versions)."""

from __future__ import annotations

from mlops.settings import Settings


def log_fixture_model(settings: Settings, onnx_model: bytes, run_name: str):
    """Log a ready-made ONNX model as an MLflow run (no training metrics), with three
    generated rows as its input example; the returned run's ``model_uri`` registers versions."""
    import numpy as np
    import pandas as pd

    from mlops import modeling
    from mlops.datagen import generate
    from registry.tracking import log_training_run

    example = modeling.features_frame(generate(10, seed=9).head(3), settings.dataset)
    example = example.astype({n: np.float32 for n in settings.dataset.numeric_names})
    return log_training_run(
        settings,
        run_name=run_name,
        params={},
        metrics={},
        tags={},
        files={},
        onnx_model=onnx_model,
        example_features=example,
        example_scores=pd.DataFrame({"probability": [0.1, 0.2, 0.3]}),
    )
