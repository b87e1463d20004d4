"""Steps the benchmark scripts share: logging a ready-made ONNX model as an MLflow run and
registering it under many names.

Imported as ``bench.support`` with the repository root on ``sys.path`` (each script puts
it there), so it never shadows the ``serving`` package the way ``bench/serving.py`` could.
"""

from __future__ import annotations

from typing import Any


def log_onnx_model(
    settings: Any,
    onnx_model: bytes,
    run_name: str,
    schema: Any = None,
    files: dict[str, bytes] | None = None,
    metrics: dict[str, float] | None = None,
) -> Any:
    """Log ``onnx_model`` as an MLflow run with ``metrics`` (default none) and evaluation
    ``files``, three generated rows as its input example (inputs of ``schema``, default the
    dataset's; window feature columns at 0) and made-up example scores; the returned run's
    ``model_uri`` registers versions."""
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
        metrics=metrics or {},
        tags={},
        files=files or {},
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


WEIGHT_ATTRIBUTES = ("coefficients", "intercepts", "class_weights", "target_weights", "base_values")
"""Float-list attributes of ONNX-ML operators that hold learned weights (linear models'
coefficients, tree ensembles' leaf values), as opposed to structure (split thresholds,
node ids)."""


def weight_variants(onnx_model: bytes, n: int, seed: int = 0, spread: float = 0.2) -> list[bytes]:
    """``n`` versions of ``onnx_model`` with different weights, as per-merchant models of one
    architecture are: each weight attribute (``WEIGHT_ATTRIBUTES``) multiplied by
    ``1 + spread * N(0, 1)`` drawn per value and per version. The graph and so the cost of a
    run stay the same; every version's bytes (and scores) differ. ``ValueError`` when the
    model has no such attribute."""
    import numpy as np
    import onnx

    base = onnx.load_from_string(onnx_model)
    slots = [
        (i, j)
        for i, node in enumerate(base.graph.node)
        for j, attr in enumerate(node.attribute)
        if attr.name in WEIGHT_ATTRIBUTES and attr.type == onnx.AttributeProto.FLOATS and attr.floats
    ]
    if not slots:
        raise ValueError("the model has no weight attribute to vary (" + ", ".join(WEIGHT_ATTRIBUTES) + ")")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        model = onnx.ModelProto()
        model.CopyFrom(base)
        for i, j in slots:
            attr = model.graph.node[i].attribute[j]
            values = np.asarray(attr.floats, dtype=np.float64)
            values *= 1.0 + spread * rng.standard_normal(values.shape)
            del attr.floats[:]
            attr.floats.extend(values.astype(np.float32).tolist())
        out.append(model.SerializeToString())
    return out


def register_variants(settings: Any, onnx_models: list[bytes], names: list[str]) -> Any:
    """Log ``onnx_models[0]`` as one MLflow run with every model of ``onnx_models`` as an
    artifact ``variants/<name>.onnx`` of it, and register ``names[i]`` (alias champion) from
    ``onnx_models[i]``'s file, printing progress every 50; the logged run."""
    import tempfile
    from pathlib import Path

    import mlflow

    from adapters.runtime import configure
    from registry.mlflow_registry import ModelRegistry

    if len(onnx_models) != len(names):
        raise ValueError(f"{len(onnx_models)} models for {len(names)} names")
    configure(settings)
    logged = log_onnx_model(settings, onnx_models[0], "bench-tenants")
    client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        for name, onnx in zip(names, onnx_models, strict=True):
            (Path(tmp) / f"{name}.onnx").write_bytes(onnx)
        client.log_artifacts(logged.run_id, tmp, artifact_path="variants")
    artifacts = client.get_run(logged.run_id).info.artifact_uri
    registry = ModelRegistry(settings)
    for i, name in enumerate(names):
        source = f"{artifacts}/variants/{name}.onnx"
        v = registry.register(name, source, logged.run_id, {}, "bench").version
        registry.move_alias(name, "champion", v, reason="bench")
        if i % 50 == 0:
            print(f"  registered {i + 1}/{len(names)}", flush=True)
    return logged
