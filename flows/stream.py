"""Stream scoring flow: consume events, update the window features, score, commit after durability.

A bounded run: it resumes the consumer group where its committed offset left it, scores at
most ``max_events`` events (or until the topic is caught up) and returns. Scheduled often,
or run in a loop, it keeps up with the topic; killed at any point, the next run writes
exactly what an uninterrupted one would have (see ``tasks.stream``).

State under ``MLOPS_HOME/stream/``: ``broker.db`` (the embedded broker's log and offsets),
``state/<topic>/<group>/`` (the window-state checkpoint, unless ``features.store`` puts it in
Redis), ``out/<topic>/<group>/`` (Parquet parts named by offset range).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from adapters.broker import Broker, SqliteBroker
from adapters.feature_store import state_store
from adapters.runtime import configure
from flows.params import AliasParam
from mlops.errors import ConfigError
from mlops.features import FeatureSet, feature_views
from mlops.onnx_model import OnnxScorer
from mlops.registry_model import CHAMPION
from mlops.routing import InvalidRouteTable, Mode, RouteTable
from mlops.settings import KafkaBrokerSpec, RedisBrokerSpec, Settings, load_settings
from mlops.stream_routes import StreamRoutes, run_table
from tasks.scoring import PinnedModel, pin_model
from tasks.stream import StreamConsumer


def stream_dir(settings: Settings) -> Path:
    """Where the stream's broker log, window state and outputs live."""
    return settings.home_path / "stream"


def broker_for(settings: Settings) -> Broker:
    """The configured broker (``stream.broker``): embedded SQLite, Redis Streams or Kafka."""
    spec = settings.stream.broker
    if isinstance(spec, RedisBrokerSpec):
        from adapters.broker_redis import RedisBroker

        return RedisBroker.from_url(spec.effective_url, spec.prefix)
    if isinstance(spec, KafkaBrokerSpec):
        from adapters.broker_kafka import KafkaBroker

        return KafkaBroker.from_spec(spec)
    return SqliteBroker(stream_dir(settings) / "broker.db")


@dataclass(frozen=True)
class PinnedRoutes:
    """What a stream run scores with: the stable model, the candidate (if routed) and the table."""

    stable: PinnedModel
    candidate: PinnedModel | None
    table: RouteTable

    @property
    def routes(self) -> StreamRoutes:
        """The pinned routes with both versions."""
        cand = self.candidate.ref.version if self.candidate else None
        return StreamRoutes(self.table, self.stable.ref.version, cand)


def pin_routes(
    settings: Settings,
    alias: str,
    candidate_alias: str | None,
    table: RouteTable | None,
) -> PinnedRoutes:
    """Pin the run's models and routes: ``alias`` (and ``candidate_alias``) under ``table``,
    or, when ``table`` is None, the online service's applied state (versions and routes from
    ``$MLOPS_HOME/run/serving-state.json``). Raises ``ConfigError`` in one line when the state
    is missing, malformed or routes traffic to an empty candidate slot."""
    if table is not None:
        stable = pin_model(settings, alias)
        candidate = (
            pin_model(settings, candidate_alias)
            if candidate_alias and table.mode is not Mode.SINGLE
            else None
        )
        return PinnedRoutes(stable, candidate, table)
    state = serving_routes(settings)
    stable = pin_model(settings, "serving", state.stable_version)
    routed = state.routed and state.candidate_version is not None
    candidate = pin_model(settings, "serving", state.candidate_version) if routed else None
    return PinnedRoutes(stable, candidate, state.table)


def serving_routes(settings: Settings) -> StreamRoutes:
    """The routes and versions the online service has applied (``$MLOPS_HOME/run/serving-state.json``).

    Raises ``ConfigError`` in one line naming the file when it is missing, unreadable, not a
    valid serving state, or routes traffic to an empty candidate slot.
    """
    from serving.state import load_state, state_path

    path = state_path(settings)
    name = settings.training.model_name
    loaded = load_state(path, name)
    if loaded is None:
        raise ConfigError(f"{path}: no applied serving state for model {name!r} (is the service running?)")
    state, _ = loaded
    try:
        return StreamRoutes(state.table(), state.stable_version, state.candidate_version)
    except InvalidRouteTable as exc:
        raise ConfigError(f"{path}: invalid serving routes: {exc}") from None


def output_dir(settings: Settings, topic: str, group: str) -> Path:
    """The folder of a consumer group's committed Parquet parts."""
    return stream_dir(settings) / "out" / topic / group


@dataclass(frozen=True)
class StreamSummary:
    """What one bounded stream run did."""

    topic: str
    group: str
    model: str
    resumed_at: int
    replayed: int
    swept: int
    batches: int
    events: int
    late: int
    next_offset: int
    end_offset: int
    output: str
    seconds: float = 0.0
    routes: str = "single"
    candidate_events: int = 0
    mirrored: int = 0

    @property
    def lag(self) -> int:
        """Events published but not yet scored by this group."""
        return self.end_offset - self.next_offset

    @property
    def events_per_second(self) -> float:
        """Scoring throughput of this run (0 when it scored nothing)."""
        return self.events / self.seconds if self.seconds > 0 and self.events else 0.0


def metrics_text(summary: StreamSummary) -> str:
    """The run's lag, throughput and counters in the Prometheus text format (labels: topic, group)."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry()
    labels = ("topic", "group")
    values = {
        "mlops_stream_lag_events": ("Events published and not yet scored by the group", summary.lag),
        "mlops_stream_committed_offset": ("The group's committed offset", summary.next_offset),
        "mlops_stream_end_offset": ("The topic's end offset", summary.end_offset),
        "mlops_stream_events_per_second": ("Scoring throughput of the last run", summary.events_per_second),
        "mlops_stream_run_events": ("Events scored by the last run", summary.events),
        "mlops_stream_run_late_events": ("Late events scored by the last run", summary.late),
        "mlops_stream_run_candidate_events": (
            "Events the candidate answered in the last run",
            summary.candidate_events,
        ),
        "mlops_stream_run_mirrored_events": (
            "Events mirrored to the candidate (shadow) in the last run",
            summary.mirrored,
        ),
    }
    for name, (doc, value) in values.items():
        Gauge(name, doc, labels, registry=registry).labels(summary.topic, summary.group).set(value)
    return generate_latest(registry).decode()


def write_metrics(settings: Settings, summary: StreamSummary) -> Path:
    """Write the run's metrics where a node-exporter textfile collector can pick them up (atomic)."""
    folder = stream_dir(settings) / "metrics"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{summary.topic}-{summary.group}.prom"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(metrics_text(summary))
    tmp.replace(path)
    return path


@flow(name="stream-score", log_prints=True)
def stream_flow(
    topic: str = "transactions",
    group: str = "scorer",
    max_events: int = 100_000,
    batch_size: int = 1_000,
    alias: AliasParam = CHAMPION,
    checkpoint_every: int = 10,
    config: str | None = None,
    candidate_alias: AliasParam | None = None,
    route_mode: str = "single",
    weight_pct: float = 0.0,
    mirror_pct: float = 0.0,
    salt: str = "",
    active_slot: str = "stable",
    follow_serving: bool = False,
) -> StreamSummary:
    """Score up to ``max_events`` new events of ``topic`` for consumer group ``group``.

    Args:
        topic: Broker topic of raw events (one per transaction).
        group: Consumer group: its committed offset, window state and outputs are its own.
        max_events: Bound of this run (it also stops when the topic is caught up).
        batch_size: Events per output part and per offset commit.
        alias: Registry alias of the model that scores.
        checkpoint_every: Batches between window-state checkpoints (a restart replays at most these).
        config: Platform config YAML (default: $MLOPS_CONFIG, else built-in defaults).
        candidate_alias: Registry alias of the candidate that routes other than single use.
        route_mode: single, shadow, canary, ab or blue_green (``mlops.routing``).
        weight_pct: canary/ab: percentage of entities the candidate answers.
        mirror_pct: shadow: percentage of events also scored by the candidate.
        salt: The hash salt of shadow, canary and ab (the online rollout's id to match it).
        active_slot: blue_green: the variant that answers (stable or candidate).
        follow_serving: Take the versions and routes from the online service's applied state
            instead (none of the alias and route parameters may be set then).
    """
    settings = load_settings(config)
    table = run_table(
        follow_serving, alias, candidate_alias, route_mode, weight_pct, mirror_pct, salt, active_slot
    )
    configure(settings)
    logger = get_run_logger()
    fs, *extra = feature_views(settings) or (FeatureSet.from_settings(settings),)
    pinned_routes = pin_routes(settings, alias, candidate_alias, table)
    pinned, cand = pinned_routes.stable, pinned_routes.candidate
    broker = broker_for(settings)
    out = output_dir(settings, topic, group)
    consumer = StreamConsumer(
        broker=broker,
        store=state_store(settings, fs, topic, group),
        fs=fs,
        schema=settings.dataset,
        scorer=OnnxScorer(pinned.onnx, settings.dataset, threads=settings.scoring.ort_threads),
        model=pinned.ref,
        out_dir=out,
        topic=topic,
        group=group,
        checkpoint_every=checkpoint_every,
        extra_views=tuple(extra),
        routes=pinned_routes.table,
        candidate=(
            (OnnxScorer(cand.onnx, settings.dataset, threads=settings.scoring.ort_threads), cand.ref)
            if cand
            else None
        ),
    )
    routes = consumer.routes.describe()
    logger.info("routes: %s", routes)
    start = consumer.start()
    logger.info(
        "%s/%s resumes at offset %d (checkpoint %d, replayed %d, swept %d uncommitted parts)",
        topic,
        group,
        start.committed,
        start.checkpoint,
        start.replayed,
        len(start.swept),
    )
    started = time.perf_counter()
    results = consumer.run(max_events, batch_size)
    seconds = time.perf_counter() - started
    summary = StreamSummary(
        topic=topic,
        group=group,
        model=pinned.ref.label(),
        resumed_at=start.committed,
        replayed=start.replayed,
        swept=len(start.swept),
        batches=len(results),
        events=sum(r.rows for r in results),
        late=sum(r.late for r in results),
        next_offset=consumer.next_offset,
        end_offset=broker.end_offset(topic),
        output=str(out),
        seconds=seconds,
        routes=routes,
        candidate_events=sum(r.candidate for r in results),
        mirrored=sum(r.mirrored for r in results),
    )
    metrics = write_metrics(settings, summary)
    create_markdown_artifact(
        key=f"stream-{topic}-{group}".lower().replace("_", "-"),
        markdown=(
            f"| topic/group | events | events/s | late | committed | end | lag |\n|---|---|---|---|---|---|---|\n"
            f"| {topic}/{group} | {summary.events} | {summary.events_per_second:,.0f} | {summary.late} "
            f"| {summary.next_offset} | {summary.end_offset} | {summary.lag} |\n\n"
            f"Routes: {routes} (candidate answered {summary.candidate_events}, "
            f"mirrored {summary.mirrored})"
        ),
        description="Stream scoring run: throughput and lag",
    )
    logger.info(
        "scored %d events in %d parts (%.0f events/s); lag %d; metrics %s",
        summary.events,
        summary.batches,
        summary.events_per_second,
        summary.lag,
        metrics,
    )
    return summary
