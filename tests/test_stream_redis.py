"""The Redis Streams broker against a real redis-server, and exactly-once scoring across SIGKILLs
on both the embedded and the Redis broker."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from adapters.broker import BrokerError
from adapters.broker_redis import RedisBroker
from adapters.services import free_port
from mlops.datagen import generate
from mlops.features import FeatureSet
from mlops.modeling import fit, to_onnx_bytes
from mlops.settings import LogisticRegressionSpec, load_settings
from tasks.stream import frame_messages, read_parts
from tests.support.stream import FEATURES_YAML, REPO, child_broker, kill_and_resume, stream_consumer


def _broker(url: str, name: str, consumer: str = "c1") -> RedisBroker:
    return RedisBroker.from_url(url, prefix=f"test:{name}", consumer=consumer)


def test_redis_broker_log_and_group_offsets(redis_url: str, request: pytest.FixtureRequest) -> None:
    """Dense offsets in publish order; each group reads from its own committed offset; a replay
    below the commit reads the log; a commit never moves backwards; acked = committed."""
    broker = _broker(redis_url, request.node.name)
    assert broker.publish("t", [("k1", {"i": 0}), ("k2", {"i": 1})]) == 2
    assert broker.publish("t", [("k1", {"i": 2})]) == 3
    assert broker.publish("other", [("x", {"i": 9})]) == 1
    got = broker.poll("t", "g", 10)
    assert [(m.offset, m.key, m.payload["i"]) for m in got] == [(0, "k1", 0), (1, "k2", 1), (2, "k1", 2)]
    assert broker.pending("t", "g") == 3
    broker.commit("t", "g", 2)
    assert broker.pending("t", "g") == 1
    again = _broker(redis_url, request.node.name, consumer="c2")
    assert [m.offset for m in again.poll("t", "g", 10)] == [2]
    assert [m.offset for m in again.poll("t", "h", 1)] == [0]
    assert [m.offset for m in again.poll("t", "g", 10, start=0)] == [0, 1, 2]
    assert (again.committed("t", "g"), again.committed("t", "h"), again.end_offset("t")) == (2, 0, 3)
    with pytest.raises(BrokerError, match="behind the committed 2"):
        again.commit("t", "g", 1)


def test_redis_reads_are_bounded_and_a_dead_consumers_entries_are_redelivered_in_order(
    redis_url: str, request: pytest.FixtureRequest
) -> None:
    """A poll delivers at most the batch asked for (nothing more is pending in the group); the
    entries a consumer received but never committed go, in order, to the next consumer's poll,
    ahead of new ones, and nothing is skipped."""
    name = request.node.name
    dead = _broker(redis_url, name, consumer="dead")
    dead.publish("t", [(f"k{i}", {"i": i}) for i in range(50)])
    assert [m.offset for m in dead.poll("t", "g", 7)] == list(range(7))
    assert dead.pending("t", "g") == 7
    dead.commit("t", "g", 3)
    assert [m.offset for m in dead.poll("t", "g", 5, start=7)] == list(range(7, 12))
    assert dead.pending("t", "g") == 9  # 3..11: the batch asked for and the uncommitted rest, no prefetch
    heir = _broker(redis_url, name, consumer="heir")  # "dead" never commits again
    assert [m.offset for m in heir.poll("t", "g", 6)] == list(range(3, 9))
    assert [m.offset for m in heir.poll("t", "g", 6, start=9)] == list(range(9, 15))
    heir.commit("t", "g", 15)
    assert heir.pending("t", "g") == 0
    assert [m.offset for m in heir.poll("t", "g", 100)] == list(range(15, 50))


def test_redis_concurrent_publishers_never_share_an_offset(
    redis_url: str, request: pytest.FixtureRequest
) -> None:
    """Two processes publishing at once interleave whole batches: offsets stay dense and unique."""
    prefix = f"test:{request.node.name}"
    script = textwrap.dedent(
        """
        import sys
        from adapters.broker_redis import RedisBroker
        b = RedisBroker.from_url(sys.argv[1], prefix=sys.argv[3])
        for i in range(50):
            b.publish("t", [(sys.argv[2], {"n": i, "j": j}) for j in range(10)])
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen([sys.executable, "-c", script, redis_url, who, prefix], env=env, cwd=REPO)
        for who in ("a", "b")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    msgs = RedisBroker.from_url(redis_url, prefix=prefix).poll("t", "g", 10_000)
    assert [m.offset for m in msgs] == list(range(1000))
    for who in ("a", "b"):
        mine = [(m.payload["n"], m.payload["j"]) for m in msgs if m.key == who]
        assert mine == [(i, j) for i in range(50) for j in range(10)]


def test_redis_down_is_a_broker_error() -> None:
    """No server at the URL: one BrokerError naming redis, no redis exception leaking."""
    broker = RedisBroker.from_url(f"redis://127.0.0.1:{free_port()}/0", prefix="x")
    with pytest.raises(BrokerError, match="redis: cannot"):
        broker.end_offset("t")


def test_server_up_runs_the_configured_redis_broker_and_down_stops_it(tmp_path: Path) -> None:
    """With `stream.broker: {kind: redis}` the service plan holds a loopback redis-server with its
    pid file and log under MLOPS_HOME/run; started, it accepts a publish; stopped, it is gone."""
    from adapters import services

    port = free_port()
    env = {
        "MLOPS_HOME": str(tmp_path / "home"),
        "MLOPS__STREAM__BROKER": f"{{kind: redis, port: {port}, appendfsync: everysec}}",
    }
    settings = load_settings(environ=env)
    (svc,) = [s for s in services.plan(settings) if s.name == "redis-broker"]
    assert svc.url == f"redis://127.0.0.1:{port}/0"
    record = services.start(settings, svc)
    try:
        assert (settings.run_dir / "redis-broker.pid.json").exists()
        assert "redis-broker" in services.running(settings)
        from flows.stream import broker_for

        broker = broker_for(settings)
        assert isinstance(broker, RedisBroker)
        assert broker.publish("t", [("k", {"i": 1})]) == 1
    finally:
        assert services.stop(settings, "redis-broker")
    assert not services.running(settings).get("redis-broker")
    assert record["log"].endswith("redis-broker.log")
    with pytest.raises(BrokerError):
        broker_for(settings).end_offset("t")
    plain = load_settings(environ={"MLOPS_HOME": str(tmp_path / "home")})
    assert "redis-broker" not in [s.name for s in services.plan(plain)]


# --------------------------------------------------------------------------- exactly once across kills

KILL_EVENTS = int(os.environ.get("MLOPS_STREAM_KILL_EVENTS", "30000"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["embedded", "redis"])
def test_ten_sigkills_leave_exactly_one_prediction_per_event_equal_to_a_clean_run(
    kind: str, redis_url: str, tmp_path: Path
) -> None:
    """Events replayed through the consumer, which is SIGKILLed at random moments 10 times and
    restarted each time, end as exactly one prediction per event, equal (features, score,
    decision, late flag) to a clean run's, on the embedded and on the Redis broker. The size is
    ``MLOPS_STREAM_KILL_EVENTS`` (30,000 here; bench/stream.py runs the same with 1,000,000)."""
    settings = load_settings(FEATURES_YAML, environ={})
    fs = FeatureSet.from_settings(settings)
    train = generate(5_000, seed=2)
    onnx = to_onnx_bytes(fit(LogisticRegressionSpec(), train, settings.dataset, seed=0), settings.dataset)
    model_file = tmp_path / "model.onnx"
    model_file.write_bytes(onnx)
    events = generate(KILL_EVENTS, seed=9).sort_values("event_time", kind="stable").reset_index(drop=True)
    where = redis_url if kind == "redis" else "embedded"

    clean_home = tmp_path / f"clean{kind}"
    clean = stream_consumer(settings.dataset, fs, onnx, clean_home, child_broker(clean_home, where))
    clean.broker.publish("tx", frame_messages(events, settings.dataset, fs))
    clean.start()
    clean.run(max_events=10**9, batch_size=500)
    expected = read_parts(clean_home / "out" / "scorer").to_pandas()

    home = tmp_path / f"killed{kind}"
    child_broker(home, where).publish("tx", frame_messages(events, settings.dataset, fs))
    assert kill_and_resume(home, model_file, where, kills_wanted=10, seed=17, total=len(events)) == 10
    got = read_parts(home / "out" / "scorer").to_pandas()
    assert got["offset"].tolist() == list(range(len(events)))
    assert got["transaction_id"].is_unique and len(got) == len(events)
    pd.testing.assert_frame_equal(got, expected)
    if kind == "redis":
        assert child_broker(home, where).pending("tx", "scorer") == 0
