"""``mlops stream`` (publish events, score the stream, look features up) and ``mlops features``
(build and check point-in-time training sets)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mlops.errors import ConfigError
from mlops_cli.common import ConfigOpt, console, handle_errors, progress, settings_for

stream_app = typer.Typer(help="Stream scoring: events -> window features -> scores.", no_args_is_help=True)
features_app = typer.Typer(
    help="Rolling-window features: build and check training sets, measure skew.", no_args_is_help=True
)

TopicOpt = Annotated[str, typer.Option("--topic", "-t", help="Broker topic of raw events.")]
GroupOpt = Annotated[
    str, typer.Option("--group", "-g", help="Consumer group (its own offsets, state, outputs).")
]


@stream_app.command("publish")
@handle_errors
def publish(
    rows: Annotated[int, typer.Option("--rows", "-n", help="Generated transactions to publish.")] = 10_000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the generated data.")] = 0,
    input_path: Annotated[
        Path | None, typer.Option("--input", "-i", help="Publish this Parquet file's rows instead.")
    ] = None,
    topic: TopicOpt = "transactions",
    config: ConfigOpt = None,
) -> None:
    """Publish transactions to the embedded broker, in time order (generated, or from a Parquet file)."""
    from mlops.features import FeatureSet

    settings = settings_for(config)
    fs = FeatureSet.from_settings(settings)  # before the heavier imports: no features, no wait
    from adapters.datasets import read_frame
    from flows.stream import broker_for
    from mlops.datagen import generate
    from tasks.stream import frame_messages

    frame = read_frame(input_path) if input_path else generate(rows, seed=seed)
    frame = frame.sort_values(fs.timestamp_column, kind="stable")
    end = broker_for(settings).publish(topic, frame_messages(frame, settings.dataset, fs))
    console.print(f"published {len(frame):,} events to {topic!r} (end offset {end:,})")


@stream_app.command("run")
@handle_errors
def run(
    topic: TopicOpt = "transactions",
    group: GroupOpt = "scorer",
    max_events: Annotated[int, typer.Option("--max-events", help="Bound of this run.")] = 100_000,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Events per part and offset commit.")
    ] = 1_000,
    alias: Annotated[str, typer.Option("--alias", "-a", help="Alias of the model that scores.")] = "champion",
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Batches between window-state checkpoints.")
    ] = 10,
    candidate_alias: Annotated[
        str | None,
        typer.Option("--candidate-alias", help="Alias of the candidate that routes other than single use."),
    ] = None,
    route_mode: Annotated[
        str, typer.Option("--route-mode", help="single, shadow, canary, ab or blue_green.")
    ] = "single",
    weight_pct: Annotated[
        float, typer.Option("--weight-pct", help="canary/ab: percent of entities on the candidate.")
    ] = 0.0,
    mirror_pct: Annotated[
        float, typer.Option("--mirror-pct", help="shadow: percent of events also scored by the candidate.")
    ] = 0.0,
    salt: Annotated[
        str, typer.Option("--salt", help="Hash salt of shadow/canary/ab (the online rollout id to match it).")
    ] = "",
    active_slot: Annotated[
        str, typer.Option("--active-slot", help="blue_green: the variant that answers.")
    ] = "stable",
    follow_serving: Annotated[
        bool,
        typer.Option(
            "--follow-serving", help="Take the versions and routes from the online service's applied state."
        ),
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Score new events of a topic: window features, ONNX Runtime, Parquet parts, then offsets.

    With a candidate and a route mode, each event is routed like an online request (sticky by
    entity for canary/ab, by transaction id for shadow); --follow-serving uses the online
    service's applied versions and routes instead."""
    if max_events < 1 or batch_size < 1 or checkpoint_every < 1:
        raise ConfigError("--max-events, --batch-size and --checkpoint-every must be at least 1")
    from mlops.stream_routes import run_table

    run_table(follow_serving, alias, candidate_alias, route_mode, weight_pct, mirror_pct, salt, active_slot)
    settings = settings_for(config)
    from flows.stream import serving_routes, stream_flow

    if follow_serving:
        serving_routes(settings)  # a missing or malformed state stops here, before any work
    with progress(f"Scoring {topic}/{group} with {'the serving state' if follow_serving else alias}"):
        s = stream_flow(
            topic,
            group,
            max_events,
            batch_size,
            alias,
            checkpoint_every,
            config=config,
            candidate_alias=candidate_alias,
            route_mode=route_mode,
            weight_pct=weight_pct,
            mirror_pct=mirror_pct,
            salt=salt,
            active_slot=active_slot,
            follow_serving=follow_serving,
        )
    table = Table(show_header=False, box=None)
    routed = f" ({s.candidate_events:,} answered by the candidate, {s.mirrored:,} mirrored)"
    for label, value in (
        ("model", s.model),
        ("routes", s.routes + (routed if not s.routes.startswith("single") else "")),
        ("resumed at offset", f"{s.resumed_at:,} (replayed {s.replayed:,}, swept {s.swept} parts)"),
        ("scored", f"{s.events:,} events in {s.batches} parts ({s.late} late, {s.events_per_second:,.0f}/s)"),
        ("committed offset", f"{s.next_offset:,} of {s.end_offset:,} (lag {s.lag:,})"),
        ("output", s.output),
    ):
        table.add_row(label, value)
    console.print(table)


@stream_app.command("query")
@handle_errors
def query(
    sql: Annotated[
        str,
        typer.Argument(
            help='One SELECT over the view stream_scores, e.g. "SELECT decision, count(*) FROM stream_scores GROUP BY 1".'
        ),
    ],
    topic: TopicOpt = "transactions",
    group: GroupOpt = "scorer",
    limit: Annotated[int, typer.Option("--limit", min=1, help="Rows to print at most.")] = 50,
    config: ConfigOpt = None,
) -> None:
    """Query a consumer group's committed stream output read-only with DuckDB (view ``stream_scores``)."""
    from adapters.warehouse_query import query_stream
    from flows.stream import output_dir

    settings = settings_for(config)
    result = query_stream(output_dir(settings, topic, group), sql, settings.query)
    table = Table(caption=f"{result.num_rows:,} rows")
    for name in result.column_names:
        table.add_column(name)
    for row in result.slice(0, limit).to_pylist():
        table.add_row(*("" if v is None else str(v) for v in row.values()))
    console.print(table)


@stream_app.command("lookup")
@handle_errors
def lookup(
    entity: Annotated[str, typer.Argument(help="Entity id (e.g. a user id).")],
    at: Annotated[
        str | None,
        typer.Option("--at", help="Time to look up (ISO 8601; default: just after the newest event)."),
    ] = None,
    topic: TopicOpt = "transactions",
    group: GroupOpt = "scorer",
    config: ConfigOpt = None,
) -> None:
    """The window features of one entity, read from the group's last state checkpoint."""
    import pandas as pd

    from flows.stream import state_store
    from mlops.features import FeatureSet

    settings = settings_for(config)
    fs = FeatureSet.from_settings(settings)
    store = state_store(settings, fs, topic, group)
    if at is not None:
        try:
            when = pd.Timestamp(datetime.fromisoformat(at))
        except ValueError:
            raise ConfigError(f"--at: not an ISO 8601 time: {at!r}") from None
        ts = int((when.tz_convert("UTC").tz_localize(None) if when.tzinfo else when).value)
    else:
        state, _ = store.load()
        if state.max_ts is None:
            raise ConfigError(f"{topic}/{group}: no state checkpoint yet (run `mlops stream run` first)")
        ts = state.max_ts + 1
    table = Table("feature", "value")
    for name, value in store.lookup(entity, ts).items():
        table.add_row(name, f"{value:.6g}")
    console.print(table)


@features_app.command("build")
@handle_errors
def build(
    events: Annotated[Path, typer.Argument(help="Parquet file of raw events (the dataset's rows).")],
    output: Annotated[Path, typer.Argument(help="Parquet file to write: the rows plus the window features.")],
    config: ConfigOpt = None,
) -> None:
    """Add the declared window features to every row, each from the events strictly before it."""
    import time

    import pyarrow.parquet as pq

    from adapters.datasets import read_frame
    from mlops.features import FeatureSet, with_features

    settings = settings_for(config)
    fs = FeatureSet.from_settings(settings)
    frame = read_frame(events)
    started = time.perf_counter()
    table = with_features(fs, frame)
    seconds = time.perf_counter() - started
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(output)
    console.print(
        f"wrote {table.num_rows:,} rows with {len(fs.names)} window features to {output} in {seconds:.2f} s"
    )


@features_app.command("check")
@handle_errors
def check(
    training: Annotated[Path, typer.Argument(help="Parquet training set with the window feature columns.")],
    events: Annotated[
        Path | None, typer.Option("--events", help="Raw events (default: the training rows themselves).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Check a training set is point-in-time correct: every feature value from events before its row."""
    from adapters.datasets import read_frame
    from mlops.features import FeatureSet, assert_point_in_time

    settings = settings_for(config)
    fs = FeatureSet.from_settings(settings)
    report = assert_point_in_time(fs, read_frame(training), read_frame(events) if events else None)
    console.print(f"point-in-time correct: {report.rows:,} rows, {len(report.checks)} features")


@features_app.command("skew")
@handle_errors
def skew(
    events: Annotated[Path, typer.Argument(help="Parquet or CSV file of raw events (the dataset's rows).")],
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="Largest relative difference allowed (counts: none).")
    ] = 1e-9,
    segment_events: Annotated[
        int, typer.Option("--segment-events", help="Most events per checkpoint of the stream state.")
    ] = 1000,
    config: ConfigOpt = None,
) -> None:
    """Training-serving skew: each event's features offline, from the stream, and looked up online.

    The online path checkpoints the stream state to the configured store (features.store: the
    embedded file, or Redis under a scratch prefix deleted afterwards) and reads it back."""
    import tempfile
    import uuid

    from adapters.datasets import read_frame
    from adapters.feature_store import EmbeddedFeatureStore, RedisFeatureStore
    from mlops.feature_skew import SkewExceeded, measure_skew
    from mlops.features import FeatureSet
    from mlops.settings import RedisStateStore

    if not tolerance >= 0 or segment_events < 1:
        raise ConfigError("--tolerance must be >= 0 and --segment-events at least 1")
    settings = settings_for(config)
    fs = FeatureSet.from_settings(settings)
    frame = read_frame(events)
    spec = settings.features.store
    if isinstance(spec, RedisStateStore):
        store = RedisFeatureStore.from_url(spec.url, fs, f"{spec.prefix}:skew:{uuid.uuid4().hex}")
        where = f"redis {store.prefix}"
        try:
            report = measure_skew(fs, frame, store, tolerance=tolerance, segment_events=segment_events)
        finally:
            store.clear()
    else:
        with tempfile.TemporaryDirectory(prefix="mlops-skew-") as tmp:
            where = "embedded checkpoint file"
            report = measure_skew(
                fs,
                frame,
                EmbeddedFeatureStore(Path(tmp), fs),
                tolerance=tolerance,
                segment_events=segment_events,
            )
    table = Table("feature", "agg", "max abs diff stream", "max abs diff online", "")
    for f in report.features:
        table.add_row(f.name, f.agg, f"{f.stream:.3g}", f"{f.online:.3g}", "EXCEEDED" if f.exceeded else "ok")
    console.print(table)
    console.print(f"{report.events:,} events, {report.checkpoints:,} checkpoints to the {where}")
    if not report.ok:
        raise SkewExceeded("offline and stream/online features differ: " + "; ".join(report.reasons()))


def register(app: typer.Typer) -> None:
    """Add ``mlops stream`` and ``mlops features`` to the CLI."""
    app.add_typer(stream_app, name="stream")
    app.add_typer(features_app, name="features")
