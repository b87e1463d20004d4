"""Typed, strict, frozen configuration.

Every setting of the platform is one of these models. They are loaded once, from a YAML
file (``configs/platform.yaml`` mirrors the embedded defaults) plus environment overrides,
and then passed around; nothing reads the environment or touches the disk at import time.

Overrides: ``MLOPS_HOME`` sets the state folder; ``MLOPS__SECTION__FIELD=value`` sets any
field (the value is parsed as YAML, so ``MLOPS__DASK__N_WORKERS=4`` is an int).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mlops.errors import ConfigError
from mlops.feature_names import onnx_input_names

ENV_PREFIX = "MLOPS__"
HOME_ENV = "MLOPS_HOME"
CONFIG_ENV = "MLOPS_CONFIG"
DEFAULT_HOME = ".mlops"


class StrictModel(BaseModel):
    """Base of every settings model: strict types, immutable, unknown fields rejected."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")


def require_unique(names: Sequence[str], what: str, scope: str = "", hint: str = "") -> None:
    """A ``ValueError`` naming each of ``names`` given more than once, in a validator's words:
    ``"<what> used twice<scope>: a, b<hint>"``."""
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{what} used twice{scope}: {', '.join(dupes)}{hint}")


# --------------------------------------------------------------------------- dataset


class NumericFeature(StrictModel):
    """A numeric input column with the range and null rate a valid batch must respect."""

    name: str
    min: float | None = None
    max: float | None = None
    max_null_fraction: float = Field(0.0, ge=0.0, le=1.0)


class CategoricalFeature(StrictModel):
    """A string input column with its closed set of allowed values."""

    name: str
    categories: tuple[str, ...] = Field(min_length=1)
    max_null_fraction: float = Field(0.0, ge=0.0, le=1.0)


class DatasetSchema(StrictModel):
    """Which columns a dataset has and what valid values look like.

    Declaring another table here is all it takes to train and score it: the id, entity and
    timestamp columns (each optional) are carried through scoring, the label is what
    training learns. Column names may hold any characters; the ONNX model sees them through
    ``mlops.feature_names`` (``input_names``). ``model_name`` is the registered model's
    default name (``training.model_name`` overrides it); unset, it is derived from ``name``.
    """

    name: str = Field("card-transactions", min_length=1)
    model_name: str | None = Field(None, min_length=1)
    id_column: str | None = "transaction_id"
    entity_column: str | None = "user_id"
    timestamp_column: str | None = "event_time"
    label_column: str = "is_fraud"
    label_values: tuple[int, ...] = (0, 1)
    numeric: tuple[NumericFeature, ...] = Field(min_length=0)
    categorical: tuple[CategoricalFeature, ...] = ()
    min_rows: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _unique_columns(self) -> DatasetSchema:
        names = self.feature_names + self.key_columns + (self.label_column,)
        require_unique(names, "column names")
        if not self.feature_names:
            raise ValueError("the dataset declares no feature columns")
        onnx_input_names(self.feature_names)  # raises when two columns map to one input name
        return self

    @property
    def input_names(self) -> dict[str, str]:
        """Each feature column's ONNX input name (see ``mlops.feature_names``)."""
        return onnx_input_names(self.feature_names)

    @property
    def default_model_name(self) -> str:
        """The registered model's name unless config sets one: ``model_name``, else one derived from ``name``."""
        return self.model_name or derived_model_name(self.name)

    @property
    def numeric_names(self) -> tuple[str, ...]:
        """Names of the numeric features, in declared order."""
        return tuple(f.name for f in self.numeric)

    @property
    def categorical_names(self) -> tuple[str, ...]:
        """Names of the categorical features, in declared order."""
        return tuple(f.name for f in self.categorical)

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Every feature name: numeric first, then categorical."""
        return self.numeric_names + self.categorical_names

    @property
    def key_columns(self) -> tuple[str, ...]:
        """The declared id, entity and timestamp columns, in that order."""
        return tuple(c for c in (self.id_column, self.entity_column, self.timestamp_column) if c)


def derived_model_name(dataset_name: str) -> str:
    """A registry-friendly model name from a dataset name: lower case, runs of anything but
    letters, digits, ``.``, ``_`` and ``-`` become one ``-`` (``"Breast Cancer"`` -> ``"breast-cancer"``)."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", dataset_name.strip().lower()).strip("-.")
    return slug or "model"


def _fraud_schema() -> DatasetSchema:
    from mlops.fraud_columns import FRAUD_SCHEMA

    return DatasetSchema.model_validate(FRAUD_SCHEMA, strict=False)


# --------------------------------------------------------------------------- features

FeatureAgg = Literal["count", "sum", "mean", "max", "last", "seconds_since_last"]
_NEEDS_COLUMN = ("sum", "mean", "max", "last")


class WindowFeature(StrictModel):
    """One per-entity aggregate over a sliding time window of raw events.

    A row at time ``t`` sees the events of its entity with ``t - window_seconds <= time < t``:
    strictly before ``t``, so a training row never sees its own event or a later one.
    ``count`` and ``seconds_since_last`` take no column; ``sum``, ``mean``, ``max`` and
    ``last`` (the value of the most recent event) aggregate ``column``. ``default`` is the
    value when the window is empty (``count`` and ``sum`` are then 0; ``seconds_since_last``
    defaults to the window length, the others to 0).
    """

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    agg: FeatureAgg
    column: str | None = None
    window_seconds: float = Field(gt=0)
    default: float | None = None

    @model_validator(mode="after")
    def _column_matches_agg(self) -> WindowFeature:
        if self.agg in _NEEDS_COLUMN and self.column is None:
            raise ValueError(f"{self.name}: agg {self.agg!r} needs a column")
        if self.agg not in _NEEDS_COLUMN and self.column is not None:
            raise ValueError(f"{self.name}: agg {self.agg!r} takes no column")
        if self.agg in ("count", "sum") and self.default not in (None, 0.0):
            raise ValueError(f"{self.name}: an empty window {self.agg} is 0, not {self.default}")
        return self

    @property
    def empty_value(self) -> float:
        """The feature's value when its window holds no event."""
        if self.default is not None:
            return self.default
        return self.window_seconds if self.agg == "seconds_since_last" else 0.0


class EmbeddedStateStore(StrictModel):
    """Window state checkpointed to a file under ``MLOPS_HOME/stream/state`` (the default)."""

    kind: Literal["embedded"] = "embedded"


class RedisStateStore(StrictModel):
    """Window state in Redis, readable by any process for online lookups."""

    kind: Literal["redis"] = "redis"
    url: str = Field(pattern=r"^rediss?://[^\s/]+(:\d+)?(/\d+)?$")
    prefix: str = Field("mlops:features", min_length=1)


StateStoreSpec = Annotated[EmbeddedStateStore | RedisStateStore, Field(discriminator="kind")]


class FeatureViewSpec(StrictModel):
    """Another set of windows over the same entity and events: the feature view of a model
    version that is still live (e.g. the outgoing side of a blue-green move)."""

    windows: tuple[WindowFeature, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> FeatureViewSpec:
        require_unique([w.name for w in self.windows], "feature names")
        return self


class FeaturesConfig(StrictModel):
    """Entity-keyed rolling-window features, computed from raw events by one implementation
    (``mlops.features``) for training, batch scoring, the stream and online lookups.

    ``entity_column`` and ``timestamp_column`` default to the dataset's. The stream accepts
    an event up to ``allowed_lateness_seconds`` older than the newest one it has seen; an
    older event is counted as late and not added to the windows. ``store`` is where the
    stream keeps its window state: an embedded checkpoint file, or Redis. ``extra_views``
    are the feature views of other live model versions: the stream keeps enough history for
    all of them, and a model of any declared view may score. A name declared in two views
    must have the same definition in both: a row holds one value per name, so the service
    can fill the features of several views into one request.
    """

    entity_column: str | None = None
    timestamp_column: str | None = None
    allowed_lateness_seconds: float = Field(300.0, ge=0)
    windows: tuple[WindowFeature, ...] = ()
    extra_views: tuple[FeatureViewSpec, ...] = ()
    store: StateStoreSpec = EmbeddedStateStore()

    @model_validator(mode="after")
    def _unique_names(self) -> FeaturesConfig:
        require_unique([w.name for w in self.windows], "feature names")
        if self.extra_views and not self.windows:
            raise ValueError("extra_views: declare the current view's windows first")
        first: dict[str, tuple[str, WindowFeature]] = {w.name: ("features.windows", w) for w in self.windows}
        for i, view in enumerate(self.extra_views):
            where = f"extra_views.{i}.windows"
            for w in view.windows:
                seen = first.setdefault(w.name, (where, w))
                if seen[1] != w:
                    raise ValueError(
                        f"{where}: {w.name!r} is declared in {seen[0]} with another definition; "
                        "give one of them another name"
                    )
        return self


class EmbeddedBrokerSpec(StrictModel):
    """The embedded broker: topics and offsets in ``MLOPS_HOME/stream/broker.db`` (SQLite)."""

    kind: Literal["embedded"] = "embedded"


class RedisBrokerSpec(StrictModel):
    """Redis Streams as the broker. Without ``url``, `mlops server up` runs ``redis-server`` on
    ``host:port`` with its data and pid file under ``MLOPS_HOME/run``; with ``url`` it is external.
    ``appendfsync`` is the server's AOF policy (``always``: a commit survives a power loss)."""

    kind: Literal["redis"] = "redis"
    url: str | None = Field(None, pattern=r"^rediss?://[^\s/]+(:\d+)?(/\d+)?$")
    host: str = "127.0.0.1"
    port: int = Field(6390, ge=1, le=65535)
    prefix: str = Field("mlops:stream", min_length=1)
    appendfsync: Literal["always", "everysec"] = "always"

    @property
    def effective_url(self) -> str:
        """Where the broker is: ``url``, else the local server's."""
        return self.url or f"redis://{self.host}:{self.port}/0"


class KafkaBrokerSpec(StrictModel):
    """Kafka as the broker (needs the optional ``confluent-kafka`` client): one partition per topic,
    offsets committed to Kafka after the outputs are durable. ``options`` are passed to the client."""

    kind: Literal["kafka"] = "kafka"
    bootstrap_servers: str = Field(min_length=1)
    options: dict[str, str] = Field(default_factory=dict)


BrokerSpec = Annotated[EmbeddedBrokerSpec | RedisBrokerSpec | KafkaBrokerSpec, Field(discriminator="kind")]


class StreamConfig(StrictModel):
    """Where stream events are published and consumed: ``broker`` (embedded, redis or kafka)."""

    broker: BrokerSpec = EmbeddedBrokerSpec()


# --------------------------------------------------------------------------- training


class GradientBoostingSpec(StrictModel):
    """scikit-learn GradientBoostingClassifier (converts to an ONNX tree ensemble)."""

    kind: Literal["gradient_boosting"] = "gradient_boosting"
    n_estimators: int = Field(100, ge=1)
    learning_rate: float = Field(0.1, gt=0)
    max_depth: int = Field(3, ge=1)
    subsample: float = Field(0.8, gt=0, le=1)
    max_train_rows: int | None = Field(60_000, ge=1000)


class LogisticRegressionSpec(StrictModel):
    """Standardised logistic regression: the baseline every candidate must beat."""

    kind: Literal["logistic_regression"] = "logistic_regression"
    C: float = Field(1.0, gt=0)
    max_iter: int = Field(1000, ge=10)
    class_weight: Literal["balanced"] | None = None


class RandomForestSpec(StrictModel):
    """scikit-learn RandomForestClassifier."""

    kind: Literal["random_forest"] = "random_forest"
    n_estimators: int = Field(100, ge=1)
    max_depth: int | None = Field(10, ge=1)
    min_samples_leaf: int = Field(20, ge=1)


ModelSpec = Annotated[
    GradientBoostingSpec | LogisticRegressionSpec | RandomForestSpec,
    Field(discriminator="kind"),
]


class TrainingConfig(StrictModel):
    """How the training flow splits data, which candidates it fits and how it checks them."""

    model_name: str | None = Field(None, min_length=1)  # default: the dataset's model name
    experiment: str | None = Field(None, min_length=1)  # default: the model name
    candidates: tuple[ModelSpec, ...] = (GradientBoostingSpec(), LogisticRegressionSpec())
    select_by: Literal["roc_auc", "pr_auc", "log_loss"] = "pr_auc"
    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 7
    decision_threshold: float = Field(0.2, gt=0, lt=1)
    parity_tolerance: float = Field(1e-4, gt=0)
    parity_rows: int = Field(5000, ge=10)
    latency_batch_rows: int = Field(10_000, ge=1)
    latency_repeats: int = Field(200, ge=5)


# --------------------------------------------------------------------------- promotion


class MetricGate(StrictModel):
    """One metric a candidate must satisfy to be promoted.

    ``min_value``/``max_value`` are absolute bounds; ``max_regression`` is how far the
    candidate may fall behind the current champion (in the metric's own unit, always >= 0).
    """

    metric: str
    higher_is_better: bool = True
    min_value: float | None = None
    max_value: float | None = None
    max_regression: float | None = Field(None, ge=0)


class PromotionConfig(StrictModel):
    """The gate between ``challenger`` and ``champion``."""

    gates: tuple[MetricGate, ...] = (
        MetricGate(metric="roc_auc", min_value=0.75, max_regression=0.002),
        MetricGate(metric="pr_auc", min_value=0.10, max_regression=0.005),
        MetricGate(metric="log_loss", higher_is_better=False, max_regression=0.01),
    )
    promote_first_version: bool = True
    lease_seconds: float = Field(60.0, gt=0)
    wait_seconds: float = Field(30.0, ge=0)
    evaluation_data: str | None = None
    """A labelled dataset (Parquet/CSV) both versions are scored on; default the candidate's holdout."""
    min_evaluation_rows: int = Field(200, ge=1)
    """Leaving out training rows may not shrink the evaluation set below this (ERROR, not a verdict)."""
    trust_logged_metrics: bool = False
    """Gate a version that has no signed evaluation record (registered outside the training flow) on
    its logged metrics."""
    trusted_evaluation_keys: tuple[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")], ...] = ()
    """Ed25519 public keys (raw, hex) of training workers elsewhere whose evaluation records are
    trusted, besides this home's own key (``$MLOPS_HOME/keys/evaluation/``)."""
    evaluation_signing_key: str | None = None
    """A PEM Ed25519 private key file training signs evaluation records with, instead of this home's key."""


# --------------------------------------------------------------------------- backends


class PrefectConfig(StrictModel):
    """Prefect: by default a temporary local API per process; or a server by URL."""

    api_url: str | None = None
    work_pool: str = "mlops-process"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"


class ServicesConfig(StrictModel):
    """Long-running services started by `mlops server up`, all on one host (loopback by default)."""

    host: str = "127.0.0.1"
    prefect_port: int = Field(4200, ge=1, le=65535)
    mlflow_port: int = Field(5000, ge=1, le=65535)
    serving_port: int = Field(3000, ge=1, le=65535)
    startup_timeout_seconds: float = Field(180.0, gt=0)


class MlflowConfig(StrictModel):
    """MLflow tracking and registry: SQLite in MLOPS_HOME unless a server URI is given."""

    tracking_uri: str | None = None
    registry_uri: str | None = None
    artifact_location: str | None = None
    audit_db_uri: str | None = None


class DaskConfig(StrictModel):
    """Dask: a local cluster sized to the machine unless a scheduler address is given."""

    address: str | None = None
    n_workers: int | None = Field(None, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    processes: bool = True
    memory_limit: str = "auto"


# --------------------------------------------------------------------------- scoring


class ScoringConfig(StrictModel):
    """Batch scoring: how the input is cut into partitions and how each worker scores.

    A partition is what one Dask task reads, validates, scores and writes; peak memory per
    worker follows ``rows_per_partition``, never the input size. Row groups are kept whole
    (the planner merges small ones up to the target and slices only bigger ones), so the
    default matches the 250,000-row groups the platform writes. Per-task overhead is a few
    milliseconds, so smaller partitions cost little and give each worker several, which
    balances the workers and amortises the first partition's page faults.
    ``ort_threads`` is lowered at run time when the workers' task threads already fill the
    cores, so sessions never oversubscribe them.

    A model trained on window features gets them computed from the input's own events plus
    ``feature_history`` (a Parquet/CSV file, folder or glob of earlier events; only those
    strictly before the input's first event count), the way training computed them.
    """

    rows_per_partition: int = Field(250_000, ge=1)
    feature_history: str | None = Field(None, min_length=1)
    ort_threads: int = Field(1, ge=1)
    decision_threshold: float | None = Field(None, gt=0, lt=1)
    compare_segments: tuple[str, ...] = ()
    psi_bins: int = Field(10, ge=2, le=100)


class QueryConfig(StrictModel):
    """Limits of one user query (``mlops query``, ``mlops stream query``): a query past its time
    or memory, or with more result rows than ``max_rows``, is stopped with a one-line error."""

    timeout_seconds: float = Field(20.0, gt=0)
    memory_limit_mb: int = Field(2048, ge=64)
    max_rows: int = Field(1_000_000, ge=1)


class AsyncJobsConfig(StrictModel):
    """Async inference (``POST /predict/async``): a durable, bounded job queue under MLOPS_HOME.

    Jobs live in ``$MLOPS_HOME/run/async-jobs.db`` (SQLite, WAL, one row per job) and survive
    a restart; ``workers`` of them are scored at a time through the same path as ``/predict``.
    A submit is refused with 429 once ``max_pending`` jobs wait or run, or ``max_stored``
    jobs are kept. A job and its result are deleted ``ttl_seconds`` after it was submitted or
    finished (a GET then says expired, later 404). A job interrupted by ``max_attempts``
    restarts fails. Callbacks go only to hosts in ``callback_hosts`` (loopback by default):
    any other callback URL is refused at submit time.
    """

    enabled: bool = True
    max_pending: int = Field(10_000, ge=1)
    max_stored: int = Field(100_000, ge=1)
    ttl_seconds: float = Field(86_400.0, gt=0)
    workers: int = Field(2, ge=1, le=64)
    max_attempts: int = Field(3, ge=1)
    callback_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")
    callback_timeout_seconds: float = Field(5.0, gt=0, le=60)
    callback_attempts: int = Field(5, ge=1)
    sweep_seconds: float = Field(10.0, gt=0)
    fsync: bool = True  # commit with an fsync (durable across power loss, not only a crash)


class TenantsConfig(StrictModel):
    """Many tenants in one service (off by default): per-tenant models, credentials and quotas.

    On, ``POST /tenants/models/{name}/predict`` scores a tenant's own registered model
    ``<model>--<tenant>`` at ``alias`` (loaded on demand into a pool of its own, within
    ``model_memory_budget_mb``, least recently used evicted) for a caller presenting that
    tenant's token (``mlops tenants add NAME``; only its SHA-256 is stored, under
    ``$MLOPS_HOME/run/tenants/``). Each tenant may make ``rate_per_second`` requests (bursts
    up to ``burst``) with at most ``max_concurrent`` in flight; beyond that it gets a 429
    with ``Retry-After``. A resolved alias is reused for ``alias_refresh_seconds`` (then
    every tenant model's alias is re-read by one registry search in the background while the
    cached versions keep answering). Tenants' models
    score on ``scoring_threads`` shared threads, round-robin between tenants. A refusal (429)
    is answered after ``refusal_delay_ms``, so a client retrying at once is slowed to that
    pace; past ``refusal_hold_max`` refusals held for one tenant, the next ones are answered
    at once and close their connection. Each tenant's prediction log is written (one Parquet
    file) every ``log_flush_seconds``, by one thread for all tenants that each second writes
    the share of tenants whose turn it is (spread evenly over the period, no burst of files),
    and at the next second for a tenant with ``log_flush_rows`` rows waiting.
    """

    enabled: bool = False
    alias: str = "champion"
    rate_per_second: float = Field(50.0, gt=0)
    burst: int = Field(100, ge=1)
    max_concurrent: int = Field(8, ge=1)
    model_memory_budget_mb: float = Field(512.0, gt=0)
    alias_refresh_seconds: float = Field(30.0, ge=0)
    scoring_threads: int = Field(2, ge=1, le=64)
    refusal_delay_ms: float = Field(50.0, ge=0, le=5000)
    refusal_hold_max: int = Field(64, ge=0)
    log_flush_seconds: float = Field(60.0, gt=0)
    log_flush_rows: int = Field(2_000, ge=1)


class OnlineFeaturesConfig(StrictModel):
    """Where ``/predict`` looks up the window features a caller did not send: the window state
    of the stream's consumer group ``group`` on ``topic``, in the store ``features.store`` names
    (the embedded checkpoint file, re-read at most every ``refresh_seconds`` when it changed, or
    Redis, each read bounded by ``timeout_seconds``). Only used when ``features.windows`` are declared."""

    topic: str = Field("transactions", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    group: str = Field("scorer", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    refresh_seconds: float = Field(0.5, gt=0, le=60)
    timeout_seconds: float = Field(0.25, gt=0, le=30)


class ServingConfig(StrictModel):
    """Online inference (`mlops serve`): what the BentoML service loads, its limits and logs.

    At start the service loads ``stable_alias`` into the ``stable`` slot (and
    ``candidate_alias``, when set, into ``candidate``), unless ``restore_state`` finds the
    slots and routes it last applied in ``$MLOPS_HOME/run/serving-state.json``. The admin
    token comes from ``admin_token`` (or ``MLOPS__SERVING__ADMIN_TOKEN``); without one, a
    random token is generated into ``$MLOPS_HOME/run/serving.token`` (mode 0600), which
    clients read. ``/feedback`` takes ``feedback_token`` (or ``MLOPS__SERVING__FEEDBACK_TOKEN``;
    default: generated into ``$MLOPS_HOME/run/feedback.token``) or the admin token.
    ``load_on_demand`` lets admin-token holders score a version that is not loaded through
    ``/v2/models/{name}/versions/{v}/infer`` (loading it); off, only loaded versions answer. One BentoML worker per service: routes and slots are process state.

    ``url`` points the platform's clients (rollout flow, `mlops serving`, the demo) at a
    service that runs elsewhere, e.g. a BentoML container built from ``bentofile.yaml``;
    `mlops server up` then starts no service of its own. Its prediction log must land in
    this ``MLOPS_HOME`` (a shared volume), where the rollout gates read it.
    """

    url: str | None = Field(
        None, pattern=r"^https?://[^\s/]+(:\d+)?/?$"
    )  # default: services.host:serving_port
    model_name: str | None = None  # default: training.model_name
    stable_alias: str = "champion"
    candidate_alias: str | None = None
    restore_state: bool = True
    admin_token: str | None = Field(None, min_length=16)
    feedback_token: str | None = Field(None, min_length=16)
    decision_threshold: float | None = Field(None, gt=0, lt=1)  # default: training's
    request_timeout_seconds: float = Field(2.0, gt=0, le=300)
    max_inflight_requests: int = Field(64, ge=1)
    max_body_bytes: int = Field(1_048_576, ge=1024)
    body_timeout_seconds: float = Field(
        5.0, gt=0, le=300
    )  # a request body must arrive within this; a slower client gets 408 before taking a slot
    max_batch_rows: int = Field(1000, ge=1)
    micro_batch_rows: int = Field(64, ge=1)
    ort_threads: int = Field(1, ge=1)
    model_memory_budget_mb: float = Field(1024.0, gt=0)
    load_on_demand: bool = False  # when on, only admin-token holders may load a version this way
    enforce_feature_ranges: bool = True
    shadow_max_pending: int = Field(256, ge=1)
    shadow_nice: int = Field(
        0, ge=0, le=19
    )  # >0: mirrored calls on their own thread, this much nicer (opt-in)
    log_flush_seconds: float = Field(2.0, gt=0)
    log_flush_rows: int = Field(20_000, ge=1)
    log_max_buffer_rows: int = Field(500_000, ge=1)
    idempotency_keys: int = Field(1024, ge=1)
    async_jobs: AsyncJobsConfig = AsyncJobsConfig()
    tenants: TenantsConfig = TenantsConfig()
    online_features: OnlineFeaturesConfig = OnlineFeaturesConfig()


# --------------------------------------------------------------------------- edge


class OtaGates(StrictModel):
    """Gates on device telemetry at each stage of an over-the-air rollout.

    A stage passes when enough of its cohort reported (else INCONCLUSIVE), few enough
    devices failed to install or health-check the new model, the devices' single-row p99
    latency stayed in bounds, and the new model's predictions on the devices' own traffic
    are distributed like the publisher's reference (population stability index).
    """

    min_reporting_fraction: float = Field(0.9, gt=0, le=1)
    max_failure_rate: float = Field(0.02, ge=0, le=1)
    max_latency_p99_ms: float = Field(20.0, gt=0)
    max_prediction_psi: float = Field(0.2, gt=0)
    min_predictions: int = Field(100, ge=1)


class EdgeConfig(StrictModel):
    """Edge delivery: the default device budget, signed bundles and the staged OTA rollout.

    ``budget`` is a budget file (``configs/edge/*.yaml``); unset, the embedded
    ``pos-terminal`` budget applies. A rollout widens the cohort through ``stages``
    (percent of the fleet, ending at 100); a stage FAIL counts against ``failure_limit``
    and past it rolls the affected devices back, INCONCLUSIVE stages count against
    ``inconclusive_limit`` and past it abort the rollout.
    """

    budget: str | None = None
    stages: tuple[float, ...] = (1.0, 10.0, 50.0, 100.0)
    gates: OtaGates = OtaGates()
    failure_limit: int = Field(0, ge=0)
    inconclusive_limit: int = Field(2, ge=0)
    manifest_ttl_hours: float = Field(168.0, gt=0)
    timestamp_ttl_hours: float = Field(24.0, gt=0)  # how stale a device lets "which release is current" get
    root_ttl_days: float = Field(365.0, gt=0)
    root_key_dir: str | None = (
        None  # offline root signing key (default: edge/keys/offline); publishing never reads it
    )
    golden_rows: int = Field(16, ge=1)
    golden_tolerance: float = Field(1e-4, gt=0)
    traffic_rows: int = Field(64, ge=1)
    reference_bins: int = Field(10, ge=2, le=100)
    fleet_fsync: bool = True  # simulated devices fsync model and state writes (off: faster large simulations)

    @model_validator(mode="after")
    def _stages_widen_to_all(self) -> EdgeConfig:
        st = self.stages
        if not st or any(b <= a for a, b in itertools.pairwise(st)) or st[0] <= 0 or st[-1] != 100.0:
            raise ValueError("stages must be increasing percentages above 0 that end at 100")
        return self


class Settings(StrictModel):
    """The whole effective configuration of one platform instance."""

    home: str = DEFAULT_HOME
    dataset: DatasetSchema = Field(default_factory=_fraud_schema)
    features: FeaturesConfig = FeaturesConfig()
    stream: StreamConfig = StreamConfig()
    training: TrainingConfig = TrainingConfig()
    promotion: PromotionConfig = PromotionConfig()
    prefect: PrefectConfig = PrefectConfig()
    mlflow: MlflowConfig = MlflowConfig()
    dask: DaskConfig = DaskConfig()
    services: ServicesConfig = ServicesConfig()
    scoring: ScoringConfig = ScoringConfig()
    query: QueryConfig = QueryConfig()
    serving: ServingConfig = ServingConfig()
    edge: EdgeConfig = EdgeConfig()

    @model_validator(mode="after")
    def _features_fit_dataset(self) -> Settings:
        ds, fc = self.dataset, self.features
        if not fc.windows:
            return self
        if (fc.timestamp_column or ds.timestamp_column) is None:
            raise ValueError("features: the dataset has no timestamp_column; set features.timestamp_column")
        taken = set(ds.feature_names + ds.key_columns + (ds.label_column,))
        views = [("features.windows", fc.windows)]
        views += [(f"features.extra_views.{i}.windows", v.windows) for i, v in enumerate(fc.extra_views)]
        for where, windows in views:
            for w in windows:
                if w.name in taken:
                    raise ValueError(f"{where}: {w.name!r} is already a dataset column")
                if w.column is not None and w.column not in ds.numeric_names:
                    raise ValueError(f"{where}: {w.name}: {w.column!r} is not a numeric dataset column")
        return self

    @model_validator(mode="after")
    def _name_the_model(self) -> Settings:
        """Fill ``training.model_name`` from the dataset (and ``experiment`` from the model name)
        when the config leaves them out, so every reader finds one resolved name."""
        training = self.training
        if training.model_name is None or training.experiment is None:
            name = training.model_name or self.dataset.default_model_name
            named = training.model_copy(
                update={"model_name": name, "experiment": training.experiment or name}
            )
            # Still inside validation: the frozen instance is completed before anyone sees it.
            object.__setattr__(self, "training", named)
        return self

    # Derived locations; every piece of state lives under ``home``.
    @property
    def home_path(self) -> Path:
        """``home`` as a path: the root of every piece of state."""
        return Path(self.home)

    @property
    def tracking_uri(self) -> str:
        """MLflow tracking URI: ``mlflow.tracking_uri``, else SQLite under ``home``."""
        return self.mlflow.tracking_uri or f"sqlite:///{self.home_path / 'mlflow.db'}"

    @property
    def registry_uri(self) -> str:
        """MLflow registry URI: ``mlflow.registry_uri``, else the tracking URI."""
        return self.mlflow.registry_uri or self.tracking_uri

    @property
    def artifact_location(self) -> str:
        """Where new MLflow experiments keep artifacts (default ``home/mlartifacts``)."""
        return self.mlflow.artifact_location or (self.home_path / "mlartifacts").as_uri()

    @property
    def audit_db_uri(self) -> str:
        """SQLAlchemy URL of the alias audit ledger (default SQLite under ``home``)."""
        return self.mlflow.audit_db_uri or f"sqlite:///{self.home_path / 'registry_audit.db'}"

    @property
    def prefect_home(self) -> Path:
        """Prefect's local database and settings folder."""
        return self.home_path / "prefect"

    @property
    def serving_url(self) -> str:
        """Base URL of the online service: ``serving.url``, else the local one of `mlops server up`."""
        if self.serving.url:
            return self.serving.url.rstrip("/")
        return f"http://{self.services.host}:{self.services.serving_port}"

    @property
    def warehouse_path(self) -> Path:
        """The score store's DuckDB warehouse file."""
        return self.home_path / "warehouse.duckdb"

    @property
    def data_dir(self) -> Path:
        """Generated and copied datasets."""
        return self.home_path / "data"

    @property
    def evaluation_keys_dir(self) -> Path:
        """This home's key that signs training runs' evaluation records."""
        return self.home_path / "keys" / "evaluation"

    @property
    def edge_dir(self) -> Path:
        """Edge variants, bundles, keys and fleet state."""
        return self.home_path / "edge"

    @property
    def run_dir(self) -> Path:
        """Pid files, logs and URLs of the services `mlops server up` started."""
        return self.home_path / "run"


# --------------------------------------------------------------------------- loading


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Nested overrides from ``MLOPS__A__B=value`` variables (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for key, raw in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: not a valid YAML value ({exc.__class__.__name__})") from exc
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: conflicts with another override")
        node[path[-1]] = value
    return tree


def _format_error(source: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{source}: {where}: {err['msg']}{more}"


def read_yaml(path: Path) -> dict[str, Any]:
    """Read one YAML mapping, with errors that name the file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{line} is not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def validate_model(model: type[StrictModel], data: Mapping[str, Any], source: str) -> Any:
    """Validate plain data into ``model``; errors name ``source`` and the first bad field."""
    try:
        # JSON mode: YAML lists become tuples, strings stay strict.
        return model.model_validate_json(json.dumps(data, default=str))
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc)) from None


def load_settings(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """The effective settings: defaults < YAML file < ``MLOPS__`` overrides < ``MLOPS_HOME``.

    ``path`` falls back to ``$MLOPS_CONFIG``; with neither, the embedded defaults apply.
    ``home`` is made absolute so that every derived URI is stable across working folders.
    """
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    source = "defaults"
    cfg_path = path or env.get(CONFIG_ENV)
    if cfg_path:
        data = read_yaml(Path(cfg_path))
        source = str(cfg_path)
    overrides = env_overrides(env)
    if overrides:
        data = _deep_merge(data, overrides)
        source = f"{source} (+{ENV_PREFIX}* overrides)"
    if env.get(HOME_ENV):
        data["home"] = env[HOME_ENV]
    data["home"] = str(Path(data.get("home") or DEFAULT_HOME).expanduser().resolve())
    return validate_model(Settings, data, source)


def settings_digest(settings: Settings) -> dict[str, Any]:
    """The settings as plain JSON data, without the machine-specific ``home``."""
    data = settings.model_dump(mode="json")
    data.pop("home", None)
    return data
