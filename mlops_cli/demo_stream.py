"""The demo's stream step: events -> window features -> scores -> DuckDB, in one bounded run.

Generated transactions are published to the embedded broker in time order; the stream flow
consumes them with the alias the batch step used, keeps the card view's rolling windows per
user (``configs/features.yaml``), scores every event, writes Parquet parts and commits its
offsets; a DuckDB query over those parts shows the counts and a few scored events.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml
from rich.table import Table

from mlops.settings import CONFIG_ENV, Settings, read_yaml
from mlops_cli.common import console

FEATURES_CONFIG = "configs/features.yaml"  # relative to the project directory
STREAM_EVENTS = 20_000
TOPIC, GROUP = "demo-transactions", "demo"
COUNTS_SQL = (
    "SELECT count(*) AS events, count(DISTINCT user_id) AS users, sum(decision::INT) AS flagged, "
    "sum(late::INT) AS late, round(avg(user_txn_count_24h), 2) AS avg_txn_24h, "
    "round(max(user_amount_sum_24h), 2) AS max_amount_24h FROM stream_scores"
)
ROWS_SQL = (
    "SELECT transaction_id, user_id, date_trunc('second', event_time::TIMESTAMP) AS event_time, user_txn_count_1h, user_txn_count_24h, "
    "round(user_amount_sum_24h, 2) AS amount_24h, round(score, 4) AS score, decision "
    "FROM stream_scores ORDER BY user_txn_count_24h DESC, event_time LIMIT 5"
)


@dataclass(frozen=True)
class StreamDemo:
    """What the stream step did: events published and scored, its throughput, where the parts are."""

    published: int
    events: int
    events_per_second: float
    model: str
    output: str


def stream_config(settings: Settings, config: str | None) -> Path:
    """The demo's config plus the card view's windows (unless it declares windows of its own),
    written under the demo's home: the stream flow reads its settings from a file."""
    from adapters.services import project_dir

    source = config or os.environ.get(CONFIG_ENV)
    data = read_yaml(Path(source)) if source else {}
    features = dict(data.get("features") or {})
    if not features.get("windows"):
        card = read_yaml(project_dir() / FEATURES_CONFIG)["features"]
        features = card | features | {"windows": card["windows"]}
    data["features"] = features
    path = settings.home_path / "demo" / "stream.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_stream_step(settings: Settings, config: str | None, alias: str) -> StreamDemo:
    """Publish generated events, score them with the stream flow, and print a DuckDB query of the parts."""
    from adapters.warehouse_query import query_stream
    from flows.stream import broker_for, output_dir, stream_flow
    from mlops.datagen import generate
    from mlops.features import FeatureSet
    from mlops.settings import load_settings
    from tasks.stream import frame_messages

    cfg = stream_config(settings, config)
    stream_settings = load_settings(cfg)
    fs = FeatureSet.from_settings(stream_settings)
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
    frame = generate(STREAM_EVENTS, seed=3, start=start).sort_values(fs.timestamp_column, kind="stable")
    broker_for(stream_settings).publish(TOPIC, frame_messages(frame, stream_settings.dataset, fs))
    console.print(f"published {len(frame):,} card transactions to {TOPIC!r} (embedded broker)")
    summary = stream_flow(
        topic=TOPIC, group=GROUP, max_events=STREAM_EVENTS, batch_size=2_000, alias=alias, config=str(cfg)
    )
    console.print(
        f"stream flow: {summary.events:,} events -> {len(fs.names)} window features -> scores with "
        f"{summary.model} ({summary.events_per_second:,.0f} events/s, lag {summary.lag}) -> {summary.output}"
    )
    out = output_dir(stream_settings, TOPIC, GROUP)
    for title, sql in (
        ("stream_scores (DuckDB over the parts)", COUNTS_SQL),
        ("top 24 h activity", ROWS_SQL),
    ):
        result = query_stream(out, sql)
        table = Table(title=title, show_edge=False)
        for name in result.column_names:
            table.add_column(name, justify="right")
        for row in result.to_pylist():
            table.add_row(*(str(v) for v in row.values()))
        console.print(table)
    return StreamDemo(len(frame), summary.events, summary.events_per_second, summary.model, summary.output)
