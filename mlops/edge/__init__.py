"""Edge delivery: compress a champion for a device budget, sign it, roll it out over the air.

Pure logic only (no Prefect, MLflow or DuckDB imports): budget and variant models, the
variant gate and selection, model compression (graph optimisation, INT8 quantization,
structured pruning, distillation), TUF-like manifests and the device-side verification
rules, cohort assignment, telemetry gate maths and the OTA rollout state machine.
Adapters (keys, bundles, telemetry, the device simulator) live in ``adapters/edge_*.py``;
the Prefect flows in ``flows/edge.py``.
"""
