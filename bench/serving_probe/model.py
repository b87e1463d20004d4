"""A small fraud-like ONNX model for serving benchmarks (30 float features, 2 classes)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

N_FEATURES = 30
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "out" / "serving_probe"
MODEL_ENV = "PROBE_MODEL"


def build_model(path: Path, *, seed: int = 7, n_rows: int = 20_000) -> Path:
    """Train a GradientBoostingClassifier on random data and save it as ONNX (no zipmap)."""
    from skl2onnx import to_onnx
    from sklearn.ensemble import GradientBoostingClassifier

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_rows, N_FEATURES)).astype(np.float32)
    logit = x[:, 0] * 1.5 - x[:, 1] + 0.5 * x[:, 2] * x[:, 3] - 3.0
    y = (rng.random(n_rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    clf = GradientBoostingClassifier(n_estimators=100, max_depth=3, random_state=seed).fit(x, y)
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(onx.SerializeToString())
    tmp.replace(path)
    return path


def model_path() -> Path:
    """The model file servers load: $PROBE_MODEL, else bench/out/serving_probe/model.onnx."""
    return Path(os.environ.get(MODEL_ENV) or DEFAULT_DIR / "model.onnx")


def load_session(path: Path | None = None):
    """An ONNX Runtime session tuned for single-row latency (one intra-op thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path or model_path()), opts, providers=["CPUExecutionProvider"])


class Scorer:
    """Score rows of features; the same code in every server variant."""

    def __init__(self, path: Path | None = None) -> None:
        self.session = load_session(path)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]  # label, probabilities

    def score(self, rows: list[list[float]]) -> list[float]:
        x = np.asarray(rows, dtype=np.float32).reshape(-1, N_FEATURES)
        _, proba = self.session.run(self.output_names, {self.input_name: x})
        return proba[:, 1].tolist()


def sample_payload(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"rows": [rng.normal(size=N_FEATURES).round(4).tolist()]}


if __name__ == "__main__":
    p = build_model(model_path())
    s = Scorer(p)
    import timeit

    rows = sample_payload()["rows"]
    n = 5000
    t = timeit.timeit(lambda: s.score(rows), number=n) / n
    print(f"model at {p}; single-row score {t * 1e6:.1f} us; example {s.score(rows)}")
