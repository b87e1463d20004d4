"""Prometheus metrics of the online service, per variant, in the service's own registry.

Scoring is measured here rather than by BentoML's metrics middleware (which costs 10-30 %
of throughput, see docs/design/serving-overhead.md): label children are created once, so a
request costs two counter increments and one histogram observation.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from mlops.routing import VARIANTS

ROLES = ("primary", "shadow")
LATENCY_BUCKETS = (
    0.001,
    0.002,
    0.004,
    0.008,
    0.016,
    0.032,
    0.064,
    0.128,
    0.256,
    0.512,
    1.024,
    2.048,
    4.096,
    8.192,
)


class ServingMetrics:
    """Counters, the latency histogram and gauges exported on ``GET /metrics``."""

    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: they double the output for nothing
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "mlops_serving_requests",
            "Answers given, per variant and role (primary = returned, shadow = mirrored).",
            ["variant", "role"],
            registry=r,
        )
        self.errors = Counter(
            "mlops_serving_errors",
            "Answers that failed after routing, per variant, role and HTTP status.",
            ["variant", "role", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "mlops_serving_latency_seconds",
            "Time from request received to answer ready, per variant and role.",
            ["variant", "role"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "mlops_serving_rejected",
            "Requests answered before routing: client errors and shed load, per endpoint and status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.inflight = Gauge("mlops_serving_inflight_requests", "Scoring requests in flight.", registry=r)
        self.shadow_skipped = Counter(
            "mlops_serving_shadow_skipped",
            "Mirror copies not sent because too many were pending.",
            registry=r,
        )
        self.feedback = Counter("mlops_serving_feedback", "Labels received on /feedback.", registry=r)
        self.feature_lookups = Counter(
            "mlops_serving_feature_lookups",
            "Rows whose window features were looked up in the online store, per outcome (ok, unavailable).",
            ["outcome"],
            registry=r,
        )
        self.feature_lookup_latency = Histogram(
            "mlops_serving_feature_lookup_seconds",
            "Time of the online feature store read of one request (all its rows).",
            buckets=(0.0001, 0.00025, 0.0005, *LATENCY_BUCKETS[:8]),
            registry=r,
        )
        self.log_rows = Counter(
            "mlops_serving_predlog_rows_written", "Prediction-log rows committed to Parquet.", registry=r
        )
        self.log_dropped = Gauge(
            "mlops_serving_predlog_dropped",
            "Prediction-log rows dropped because the buffer was full.",
            registry=r,
        )
        self.log_buffered = Gauge(
            "mlops_serving_predlog_buffered",
            "Prediction-log and feedback rows waiting to be flushed.",
            registry=r,
        )
        self.slot_version = Gauge(
            "mlops_serving_slot_version", "Model version in each slot (0 = empty).", ["slot"], registry=r
        )
        self.candidate_pct = Gauge(
            "mlops_serving_route_candidate_pct",
            "Share of live answers routed to the candidate, percent (mirror share in shadow).",
            registry=r,
        )
        self.models_loaded = Gauge(
            "mlops_serving_models_loaded", "Model versions loaded in the pool.", registry=r
        )
        self.model_bytes = Gauge(
            "mlops_serving_model_memory_bytes", "Memory charged to loaded model versions.", registry=r
        )
        self.evictions = Gauge(
            "mlops_serving_model_evictions", "Versions evicted from the pool since start.", registry=r
        )
        self.tenant_requests = Counter(
            "mlops_serving_tenant_requests",
            "Requests on the tenant route, per tenant and HTTP status.",
            ["tenant", "status"],
            registry=r,
        )
        self.tenant_latency = Histogram(
            "mlops_serving_tenant_latency_seconds",
            "Time from request received to answer ready on the tenant route, per tenant.",
            ["tenant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tenant_models_loaded = Gauge(
            "mlops_serving_tenant_models_loaded", "Tenant model versions loaded in their pool.", registry=r
        )
        self._req = {(v, role): self.requests.labels(v, role) for v in VARIANTS for role in ROLES}
        self._lat = {(v, role): self.latency.labels(v, role) for v in VARIANTS for role in ROLES}
        self._tenant_req: dict[tuple[str, int], Any] = {}  # (tenant, status) -> its counter
        self._tenant_lat: dict[str, Any] = {}  # tenant -> its histogram

    def answered(self, variant: str, role: str, seconds: float, n: int = 1) -> None:
        """Count ``n`` answers of ``variant`` in ``role`` and observe their latency once."""
        self._req[variant, role].inc(n)
        self._lat[variant, role].observe(seconds)

    def failed(self, variant: str, role: str, status: int, n: int = 1) -> None:
        """Count ``n`` answers of ``variant`` in ``role`` that failed with HTTP ``status``."""
        self.errors.labels(variant, role, str(status)).inc(n)

    def tenant_answered(self, tenant: str, status: int) -> None:
        """Count one answer of HTTP ``status`` on the tenant route to ``tenant`` (only tenants
        that authenticated get here, so the series stay bounded by the tenants created)."""
        child = self._tenant_req.get((tenant, status))
        if child is None:
            child = self._tenant_req[tenant, status] = self.tenant_requests.labels(tenant, str(status))
        child.inc()

    def tenant_scored(self, tenant: str, seconds: float) -> None:
        """Observe the latency of one answer scored for ``tenant``."""
        child = self._tenant_lat.get(tenant)
        if child is None:
            child = self._tenant_lat[tenant] = self.tenant_latency.labels(tenant)
        child.observe(seconds)

    def render(self) -> bytes:
        """Every metric of the registry in the Prometheus text format."""
        return generate_latest(self.registry)
