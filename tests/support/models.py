"""A ready-made ONNX model logged as an MLflow run (fixtures and benchmarks that need versions):
the benchmarks' ``log_onnx_model``, under the name the tests use."""

from __future__ import annotations

from bench.support import log_onnx_model as log_fixture_model

__all__ = ["log_fixture_model"]
