"""Stream scoring: the embedded broker, and a consumer whose outputs are exactly-once across kills."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from adapters.broker import BrokerError, SqliteBroker
from adapters.feature_store import EmbeddedFeatureStore
from mlops.datagen import generate
from mlops.features import FeatureSet, compute_offline
from mlops.modeling import fit, to_onnx_bytes
from mlops.onnx_model import OnnxScorer
from mlops.scoring import ModelRef
from mlops.settings import LogisticRegressionSpec, Settings, load_settings
from tasks.stream import StreamConsumer, frame_messages, part_name, read_parts
from tests.support.stream import FEATURES_YAML, REPO, kill_and_resume, stream_consumer


@pytest.fixture(scope="module")
def settings():
    return load_settings(FEATURES_YAML, environ={})


@pytest.fixture(scope="module")
def fs(settings) -> FeatureSet:
    return FeatureSet.from_settings(settings)


@pytest.fixture(scope="module")
def model_file(settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real logistic-regression model, trained on generated data and exported to ONNX."""
    train = generate(5_000, seed=2)
    onnx = to_onnx_bytes(fit(LogisticRegressionSpec(), train, settings.dataset, seed=0), settings.dataset)
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    path.write_bytes(onnx)
    return path


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    """3,000 generated transactions in time order (what the topic carries)."""
    df = generate(3_000, seed=9)
    return df.sort_values("event_time", kind="stable").reset_index(drop=True)


def _consumer(
    settings, fs, model_file: Path, home: Path, group: str = "scorer", broker_timeout: float = 30.0
) -> StreamConsumer:
    broker = SqliteBroker(home / "broker.db", timeout_seconds=broker_timeout)
    return stream_consumer(
        settings.dataset, fs, model_file.read_bytes(), home, broker, group, checkpoint_every=3
    )


@dataclass(frozen=True)
class Topic:
    """The module's events and model, and consumers of a topic that holds them."""

    settings: Settings
    fs: FeatureSet
    model_file: Path
    events: pd.DataFrame

    def consumer(self, home: Path, **kwargs: Any) -> StreamConsumer:
        """A consumer in ``home`` whose topic ``tx`` holds every event."""
        consumer = _consumer(self.settings, self.fs, self.model_file, home, **kwargs)
        consumer.broker.publish("tx", frame_messages(self.events, self.settings.dataset, self.fs))
        return consumer


@pytest.fixture
def topic(settings, fs: FeatureSet, model_file: Path, events: pd.DataFrame) -> Topic:
    return Topic(settings, fs, model_file, events)


# --------------------------------------------------------------------------- broker


def test_broker_log_and_group_offsets(tmp_path: Path) -> None:
    """Messages get dense offsets in publish order; each group reads from its own committed
    offset; a commit never moves backwards; a second handle on the file sees the same log."""
    broker = SqliteBroker(tmp_path / "b.db")
    assert broker.publish("t", [("k1", {"i": 0}), ("k2", {"i": 1})]) == 2
    assert broker.publish("t", [("k1", {"i": 2})]) == 3
    assert broker.publish("other", [("x", {"i": 9})]) == 1
    assert [(m.offset, m.key, m.payload["i"]) for m in broker.poll("t", "g", 10)] == [
        (0, "k1", 0),
        (1, "k2", 1),
        (2, "k1", 2),
    ]
    broker.commit("t", "g", 2)
    again = SqliteBroker(tmp_path / "b.db")
    assert [m.offset for m in again.poll("t", "g", 10)] == [2]
    assert [m.offset for m in again.poll("t", "h", 1)] == [0]
    assert (again.committed("t", "g"), again.committed("t", "h"), again.end_offset("t")) == (2, 0, 3)
    with pytest.raises(BrokerError, match="behind the committed 2"):
        again.commit("t", "g", 1)


def test_broker_concurrent_publishers_never_share_an_offset(tmp_path: Path) -> None:
    """Two processes publishing at once interleave whole batches: offsets stay dense and unique."""
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from adapters.broker import SqliteBroker
        b = SqliteBroker(Path(sys.argv[1]))
        for i in range(50):
            b.publish("t", [(sys.argv[2], {"n": i, "j": j}) for j in range(10)])
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "b.db"), who], env=env, cwd=REPO)
        for who in ("a", "b")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    msgs = SqliteBroker(tmp_path / "b.db").poll("t", "g", 10_000)
    assert [m.offset for m in msgs] == list(range(1000))
    for who in ("a", "b"):
        mine = [(m.payload["n"], m.payload["j"]) for m in msgs if m.key == who]
        assert mine == [(i, j) for i in range(50) for j in range(10)]


# --------------------------------------------------------------------------- consumer


def test_stream_scores_every_event_once_with_the_offline_features(topic: Topic, tmp_path: Path) -> None:
    """Consuming a topic in bounded runs writes one row per event, with the window features the
    offline computation gives and the scores ONNX Runtime gives on the same rows; offsets are
    committed up to the end."""
    settings, fs, model_file, events = topic.settings, topic.fs, topic.model_file, topic.events
    consumer = topic.consumer(tmp_path)
    consumer.start()
    first = consumer.run(max_events=1_000, batch_size=300)
    assert [r.rows for r in first] == [300, 300, 300, 100]
    consumer = _consumer(settings, fs, model_file, tmp_path)  # a later run of the flow
    report = consumer.start()
    assert (report.committed, report.checkpoint, report.replayed) == (1000, 1000, 0)
    consumer.run(max_events=10_000, batch_size=300)
    assert consumer.broker.committed("tx", "scorer") == len(events) == consumer.next_offset

    out = read_parts(tmp_path / "out" / "scorer").to_pandas()
    assert out["offset"].tolist() == list(range(len(events)))
    assert out["transaction_id"].tolist() == events["transaction_id"].tolist()
    expected = compute_offline(fs, events).to_pandas()
    for name in fs.names:
        np.testing.assert_allclose(out[name], expected[name], rtol=1e-12, atol=1e-9, err_msg=name)
    scorer = OnnxScorer(model_file.read_bytes(), settings.dataset)
    np.testing.assert_allclose(out["score"], scorer.predict_proba(events), rtol=1e-6)
    assert (out["decision"] == (out["score"] >= 0.2)).all()
    assert not out["late"].any()


def test_a_part_whose_commit_failed_is_replaced_and_the_state_replays_to_the_commit(
    settings, fs: FeatureSet, model_file: Path, events: pd.DataFrame, tmp_path: Path
) -> None:
    """Given a batch whose part was written but whose offset commit failed (the broker was
    locked), and a window checkpoint one batch behind the commit, a restarted consumer with
    another batch size deletes the uncommitted part, replays the log from the checkpoint to the
    committed offset without scoring, and ends with each event exactly once and the offline
    features."""
    import sqlite3

    from adapters.broker import BrokerError

    consumer = _consumer(settings, fs, model_file, tmp_path, broker_timeout=0.2)
    consumer.broker.publish("tx", frame_messages(events, settings.dataset, fs))
    consumer.checkpoint_every = 2
    consumer.start()
    for _ in range(3):
        consumer.step(100)  # checkpoint after the 2nd batch: state at 200, committed 300
    lock = sqlite3.connect(tmp_path / "broker.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    with pytest.raises(BrokerError, match="cannot commit"):
        consumer.step(100)  # part 300-400 is on disk, its commit failed
    lock.execute("ROLLBACK")
    lock.close()
    assert (tmp_path / "out" / "scorer" / part_name(300, 400)).exists()

    restarted = _consumer(settings, fs, model_file, tmp_path)
    report = restarted.start()
    assert (report.committed, report.checkpoint, report.replayed) == (300, 200, 100)
    assert report.swept == (part_name(300, 400),)
    restarted.run(max_events=10_000, batch_size=250)
    out = read_parts(tmp_path / "out" / "scorer").to_pandas()
    assert out["offset"].tolist() == list(range(len(events)))
    expected = compute_offline(fs, events).to_pandas()
    for name in fs.names:
        np.testing.assert_allclose(out[name], expected[name], rtol=1e-12, atol=1e-9, err_msg=name)


def test_a_model_trained_with_window_features_is_fed_them_in_the_stream(
    settings, fs: FeatureSet, events: pd.DataFrame, tmp_path: Path
) -> None:
    """A model trained on a point-in-time training set (dataset columns + window features) gets,
    in the stream, the window features of each event: its stream scores equal its scores on the
    offline features of the same events."""
    from mlops.features import model_schema, with_features

    extended = model_schema(settings.dataset, fs)
    train = with_features(fs, generate(5_000, seed=2)).to_pandas()
    onnx = to_onnx_bytes(fit(LogisticRegressionSpec(), train, extended, seed=0), extended)
    model_file = tmp_path / "windowed.onnx"
    model_file.write_bytes(onnx)
    consumer = _consumer(settings, fs, model_file, tmp_path)
    assert consumer._model_windows == list(fs.names)
    consumer.broker.publish("tx", frame_messages(events, settings.dataset, fs))
    consumer.start()
    consumer.run(max_events=10_000, batch_size=500)

    out = read_parts(tmp_path / "out" / "scorer").to_pandas()
    offline = with_features(fs, events).to_pandas()
    expected = OnnxScorer(onnx, extended).predict_proba(offline)
    np.testing.assert_allclose(out["score"], expected, rtol=1e-6)
    without = OnnxScorer(model_file.read_bytes(), settings.dataset)
    assert not np.allclose(expected, _scores_with_zero_windows(without, offline, fs), rtol=1e-3)


def test_a_blue_green_pair_of_views_is_served_from_one_stream_state(
    settings, fs: FeatureSet, events: pd.DataFrame, window_model: bytes, tmp_path: Path
) -> None:
    """Dual-write window: the config's current view has other windows, the live model was
    trained on the card view, declared as an extra view. One consumer keeps both views'
    history, feeds the model its own view's features (equal to the offline ones) and writes
    them with the scores. Without the extra view the same model is refused in one line."""
    from mlops.features import FeatureViewMismatch, model_schema, model_view, with_features
    from mlops.settings import WindowFeature

    new_view = fs.with_windows([WindowFeature(name="user_txn_count_2h", agg="count", window_seconds=7200.0)])
    onnx = window_model
    ref = ModelRef(
        "fraud-detector",
        1,
        "champion",
        0.2,
        hashlib.sha256(onnx).hexdigest()[:16],
        model_view(fs.lineage_tags()),
    )

    def consumer(extra: tuple[FeatureSet, ...]) -> StreamConsumer:
        return StreamConsumer(
            broker=SqliteBroker(tmp_path / "broker.db"),
            store=EmbeddedFeatureStore(tmp_path / "state", new_view, extra),
            fs=new_view,
            schema=settings.dataset,
            scorer=OnnxScorer(onnx, settings.dataset),
            model=ref,
            out_dir=tmp_path / "out",
            topic="tx",
            group="scorer",
            extra_views=extra,
        )

    with pytest.raises(FeatureViewMismatch, match=f"{fs.digest()}.*{new_view.digest()}"):
        consumer(())
    both = consumer((fs,))
    assert both._model_windows == list(fs.names)
    both.broker.publish("tx", frame_messages(events, settings.dataset, fs))
    both.start()
    both.run(max_events=10_000, batch_size=700)
    out = read_parts(tmp_path / "out").to_pandas()
    offline = with_features(fs, events).to_pandas()
    for name in fs.names:
        np.testing.assert_allclose(out[name], offline[name], rtol=1e-12, atol=1e-9, err_msg=name)
    expected = OnnxScorer(onnx, model_schema(settings.dataset, fs)).predict_proba(offline)
    np.testing.assert_allclose(out["score"], expected, rtol=1e-6)
    restarted = consumer((fs,))
    restarted.start()  # the checkpoint holds both views' history and loads back
    at = int(offline["event_time"].max().value) + 1
    user = offline["user_id"].iloc[-1]
    assert restarted.state.lookup(user, at, new_view) == both.state.lookup(user, at, new_view)


def _scores_with_zero_windows(scorer: OnnxScorer, frame: pd.DataFrame, fs: FeatureSet) -> np.ndarray:
    feeds = scorer.feeds(frame)
    for name in fs.names:
        feeds[name] = np.zeros((len(frame), 1), np.float32)
    return scorer.run(feeds)


@pytest.mark.slow
def test_a_consumer_killed_at_random_moments_writes_exactly_an_uninterrupted_run(
    topic: Topic, tmp_path: Path
) -> None:
    """A consumer SIGKILLed at random moments (mid-batch, mid-write, between part and commit,
    between commit and checkpoint) and restarted each time ends with exactly the rows, window
    features and scores of a run that was never interrupted: no event lost or scored twice."""
    settings, fs, model_file, events = topic.settings, topic.fs, topic.model_file, topic.events
    clean_home = tmp_path / "clean"
    clean = topic.consumer(clean_home)
    clean.start()
    began = time.monotonic()
    clean.run(max_events=10**9, batch_size=97)
    clean_s = time.monotonic() - began  # kills land within the first half of a whole run's time
    expected = read_parts(clean_home / "out" / "scorer").to_pandas()

    home = tmp_path / "killed"
    SqliteBroker(home / "broker.db").publish("tx", frame_messages(events, settings.dataset, fs))
    # five runs killed at a random moment, then one left to finish
    kills = kill_and_resume(
        home,
        model_file,
        "embedded",
        kills_wanted=5,
        seed=17,
        total=len(events),
        batch=97,
        min_wait=0.05 * clean_s,
        max_wait=0.5 * clean_s,
    )
    assert kills == 5
    got = read_parts(home / "out" / "scorer").to_pandas()
    assert got["offset"].tolist() == list(range(len(events)))
    pd.testing.assert_frame_equal(got, expected)


def test_an_event_older_than_the_watermark_is_scored_and_flagged_late(
    settings, fs: FeatureSet, model_file: Path, events: pd.DataFrame, tmp_path: Path
) -> None:
    """An event that arrives more than the allowed lateness behind the newest one is still
    scored, flagged ``late`` in its row and counted, and does not enter the windows."""
    consumer = _consumer(settings, fs, model_file, tmp_path)
    head = events.head(200)
    stale = head.head(1).assign(
        transaction_id="stale", event_time=head["event_time"].min() - pd.Timedelta(hours=1)
    )
    consumer.broker.publish("tx", frame_messages(head, settings.dataset, fs))
    consumer.broker.publish("tx", frame_messages(stale, settings.dataset, fs))
    consumer.start()
    results = consumer.run(max_events=1_000, batch_size=1_000)
    assert [r.late for r in results] == [1]
    out = read_parts(tmp_path / "out" / "scorer").to_pandas()
    assert out.loc[out["late"], "transaction_id"].tolist() == ["stale"]
    assert consumer.state.late_events == 1 and consumer.state.retained_events == 200


def test_events_missing_model_columns_are_a_data_error(
    settings,
    fs: FeatureSet,
    model_file: Path,
    tmp_path: Path,
) -> None:
    """An event without the dataset's feature columns stops the batch with a DataError, and
    nothing is committed for it."""
    consumer = _consumer(settings, fs, model_file, tmp_path)
    ts = int(pd.Timestamp("2026-01-01").value)
    consumer.broker.publish("tx", [("u1", {"user_id": "u1", "event_time": ts, "amount": 3.0})])
    consumer.start()
    from mlops.errors import DataError

    with pytest.raises(DataError, match="events lack"):
        consumer.step(10)
    assert consumer.broker.committed("tx", "scorer") == 0
    assert not (tmp_path / "out" / "scorer").exists() or not list((tmp_path / "out" / "scorer").iterdir())


def test_timestamps_round_trip_through_the_topic(settings, fs: FeatureSet, events: pd.DataFrame) -> None:
    """An event's time goes through the broker as int64 nanoseconds, losing nothing."""
    msgs = list(frame_messages(events.head(5), settings.dataset, fs))
    back = pa.array([m[1]["event_time"] for m in msgs], pa.int64()).cast(pa.timestamp("ns")).to_pandas()
    assert (back.to_numpy() == events["event_time"].head(5).to_numpy()).all()
    assert [m[0] for m in msgs] == events["user_id"].head(5).tolist()
    time.sleep(0)


def test_stream_parts_are_queryable_read_only_as_stream_scores(tmp_path: Path) -> None:
    """`mlops stream query` reads a group's committed parts as the view stream_scores; anything
    but one read statement, or a read of a file outside the parts, is refused in one line."""
    from adapters.warehouse_query import QueryRefused, query_stream
    from mlops.errors import DataError
    from tasks.stream import write_part

    out = tmp_path / "out"
    with pytest.raises(DataError, match="no stream output yet"):
        query_stream(out, "SELECT 1")
    write_part(out, pa.table({"offset": [0, 1], "decision": [True, False]}), 0, 2)
    write_part(out, pa.table({"offset": [2], "decision": [True]}), 2, 3)
    got = query_stream(out, "SELECT decision, count(*) AS n FROM stream_scores GROUP BY 1 ORDER BY 1")
    assert got.to_pylist() == [{"decision": False, "n": 1}, {"decision": True, "n": 2}]
    with pytest.raises(QueryRefused):
        query_stream(out, "COPY (SELECT 1) TO 'x.csv'")
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    with pytest.raises(QueryRefused):
        query_stream(out, f"SELECT * FROM read_csv('{secret}')")
