"""Steps the benchmark scripts share: logging a ready-made ONNX model as an MLflow run and
registering it under many names.

Imported as ``bench.support`` with the repository root on ``sys.path`` (each script puts
it there), so it never shadows the ``serving`` package the way ``bench/serving.py`` could.
"""

from __future__ import annotations

from typing import Any


def log_onnx_model(settings: Any, onnx_model: bytes, run_name: str, schema: Any = None) -> Any:
    """Log ``onnx_model`` as an MLflow run with no training metrics, three generated rows as its
    input example (inputs of ``schema``, default the dataset's; window feature columns at 0) and
    made-up example scores; the returned run's ``model_uri`` registers versions."""
    import numpy as np
    import pandas as pd

    from mlops import modeling
    from mlops.datagen import generate
    from registry.tracking import log_training_run

    schema = schema or settings.dataset
    rows = generate(10, seed=9).head(3)
    rows = rows.assign(**{n: 0.0 for n in schema.numeric_names if n not in rows.columns})
    example = modeling.features_frame(rows, schema)
    example = example.astype({n: np.float32 for n in schema.numeric_names})
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


def log_and_register(settings: Any, onnx: bytes, names: list[str]) -> Any:
    """Log ``onnx`` as one MLflow run and register it as each of ``names`` (alias champion),
    printing progress every 50; the logged run."""
    from adapters.runtime import configure
    from registry.mlflow_registry import ModelRegistry

    configure(settings)
    logged = log_onnx_model(settings, onnx, "bench-tenants")
    registry = ModelRegistry(settings)
    for i, name in enumerate(names):
        v = registry.register(name, logged.model_uri, logged.run_id, {}, "bench").version
        registry.move_alias(name, "champion", v, reason="bench")
        if i % 50 == 0:
            print(f"  registered {i + 1}/{len(names)}", flush=True)
    return logged
