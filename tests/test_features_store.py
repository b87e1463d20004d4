"""The window-state stores: crash-safe embedded checkpoints and Redis, both resuming exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adapters.feature_store import EmbeddedFeatureStore, FeatureStore, FeatureStoreError, RedisFeatureStore
from adapters.services import free_port
from mlops.datagen import generate
from mlops.features import FeatureSet, StateMismatch, StreamFeatures, timestamps_ns
from mlops.settings import load_settings

REPO = Path(__file__).resolve().parent.parent
FEATURES_YAML = REPO / "configs" / "features.yaml"


@pytest.fixture(scope="module")
def fs() -> FeatureSet:
    return FeatureSet.from_settings(load_settings(FEATURES_YAML, environ={}))


@pytest.fixture(scope="module")
def stream() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4,000 generated events in time order: (user ids, times in ns, amounts)."""
    df = generate(4_000, seed=21)
    order = np.argsort(df["event_time"].to_numpy(), kind="stable")
    return (
        df["user_id"].to_numpy()[order],
        timestamps_ns(df["event_time"])[order],
        df["amount"].to_numpy()[order],
    )


def _run(state: StreamFeatures, stream: tuple, start: int, stop: int) -> None:
    users, ts, amounts = stream
    for i in range(start, stop):
        state.update(users[i], int(ts[i]), {"amount": float(amounts[i])})


def _stores(
    kind: str, tmp_path: Path, fs: FeatureSet, redis_url: str | None
) -> tuple[FeatureStore, FeatureStore]:
    """Two handles on one store: the writer's and a reader's (another process, in production)."""
    if kind == "embedded":
        return EmbeddedFeatureStore(tmp_path / "state", fs), EmbeddedFeatureStore(tmp_path / "state", fs)
    prefix = f"t{os.getpid()}:{tmp_path.name}"
    return RedisFeatureStore.from_url(redis_url, fs, prefix), RedisFeatureStore.from_url(
        redis_url, fs, prefix
    )


@pytest.fixture(params=["embedded", "redis"])
def stores(
    request: pytest.FixtureRequest, tmp_path: Path, fs: FeatureSet
) -> tuple[FeatureStore, FeatureStore]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    return _stores(request.param, tmp_path, fs, url)


def test_restart_resumes_where_the_checkpoint_left_off(stores: tuple, fs: FeatureSet, stream: tuple) -> None:
    """A stream checkpointed half-way, restarted from the store and fed the rest, ends in exactly
    the state of an uninterrupted run; the checkpoint carries the positions it covers."""
    writer, reader = stores
    state, positions = writer.load()
    assert positions == {} and state.events_seen == 0
    n = len(stream[0])
    _run(state, stream, 0, n // 3)
    writer.save(state, {"events": n // 3})
    _run(state, stream, n // 3, n // 2)
    writer.save(state, {"events": n // 2})
    _run(state, stream, n // 2, n // 2 + 100)  # processed, never checkpointed: lost with the crash

    restarted, positions = reader.load()
    assert positions == {"events": n // 2} and restarted.events_seen == n // 2
    _run(restarted, stream, positions["events"], n)
    clean = StreamFeatures(fs)
    _run(clean, stream, 0, n)
    assert restarted.counters() == clean.counters()
    now = clean.max_ts + 1
    for user in set(stream[0][-500:]):
        assert restarted.lookup(user, now) == clean.lookup(user, now)


def test_online_lookup_reads_the_last_checkpoint(stores: tuple, fs: FeatureSet, stream: tuple) -> None:
    """Another handle on the store answers lookups from the last checkpoint: what the writer
    answered at save time, not what it has processed since."""
    writer, reader = stores
    state = StreamFeatures(fs)
    _run(state, stream, 0, 2000)
    writer.save(state, {"events": 2000})
    now = state.max_ts + 1
    users = list(dict.fromkeys(stream[0][1500:2000]))[:50]
    saved = {u: state.lookup(u, now) for u in users}
    _run(state, stream, 2000, 4000)
    assert {u: reader.lookup(u, now) for u in users} == saved
    assert reader.lookup("nobody", now)["user_txn_count_24h"] == 0
    writer.save(state, {"events": 4000})
    assert {u: reader.lookup(u, now) for u in users} == {u: state.lookup(u, now) for u in users}


def test_state_for_other_declarations_is_refused(stores: tuple, fs: FeatureSet, stream: tuple) -> None:
    """A checkpoint written for other feature declarations is not silently reused."""
    writer, _ = stores
    state = StreamFeatures(fs)
    _run(state, stream, 0, 10)
    writer.save(state, {"events": 10})
    other = FeatureSet(fs.entity_column, fs.timestamp_column, fs.windows[:2], fs.lateness_ns)
    if isinstance(writer, EmbeddedFeatureStore):
        again = EmbeddedFeatureStore(writer.folder, other)
    else:
        again = RedisFeatureStore(writer.client, other, writer.prefix)
    with pytest.raises(StateMismatch, match="rebuild it from the events"):
        again.load()


def test_redis_store_writes_only_changed_entities_and_deletes_emptied_ones(
    redis_url: str, fs: FeatureSet, tmp_path: Path
) -> None:
    """A checkpoint writes the entities that changed since the last one; an entity whose events
    all aged out of the windows is deleted from Redis."""
    store = RedisFeatureStore.from_url(redis_url, fs, f"changed:{tmp_path.name}")
    state = StreamFeatures(fs)
    t0 = int(pd.Timestamp("2026-01-01").value)
    state.update("old", t0, {"amount": 1.0})
    state.update("busy", t0 + 1, {"amount": 2.0})
    store.save(state, {"events": 2})
    assert sorted(k.decode() for k in store.client.scan_iter(f"{store.prefix}:e:*")) == [
        f"{store.prefix}:e:busy",
        f"{store.prefix}:e:old",
    ]
    week = 8 * 86400 * 10**9
    state.update("busy", t0 + week, {"amount": 3.0})  # "old" falls out of every window
    store.save(state, {"events": 3})
    assert [k.decode() for k in store.client.scan_iter(f"{store.prefix}:e:*")] == [f"{store.prefix}:e:busy"]
    assert store.load()[0].entities == 1


def test_redis_down_is_a_store_error(fs: FeatureSet) -> None:
    """With no Redis listening, saving fails with one readable FeatureStoreError."""
    store = RedisFeatureStore.from_url(f"redis://127.0.0.1:{free_port()}/0", fs)
    with pytest.raises(FeatureStoreError, match="redis: cannot"):
        store.save(StreamFeatures(fs), {})


def test_corrupt_checkpoint_is_a_store_error(tmp_path: Path, fs: FeatureSet) -> None:
    """A checkpoint file that is not an Arrow file fails with FeatureStoreError naming it."""
    store = EmbeddedFeatureStore(tmp_path, fs)
    store.path.write_bytes(b"not arrow")
    with pytest.raises(FeatureStoreError, match="unreadable window state"):
        store.load()


CHECKPOINT_LOOP = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from adapters.feature_store import EmbeddedFeatureStore
    from mlops.features import FeatureSet
    from mlops.settings import load_settings

    fs = FeatureSet.from_settings(load_settings(sys.argv[1], environ={}))
    store = EmbeddedFeatureStore(Path(sys.argv[2]), fs)
    state, positions = store.load()
    i = positions.get("events", 0)
    t0 = 1_767_225_600_000_000_000
    while True:
        for _ in range(200):
            state.update(f"u{i % 997}", t0 + i * 10**9, {"amount": float(i % 100)})
            i += 1
        store.save(state, {"events": i})
        if i == 200:
            print("first", flush=True)
    """
)


@pytest.mark.slow
def test_checkpoint_survives_being_killed_mid_write(tmp_path: Path, fs: FeatureSet) -> None:
    """A writer killed with SIGKILL at arbitrary moments of its checkpoint loop always leaves a
    readable checkpoint whose state matches its positions, and the next writer resumes from it."""
    folder = tmp_path / "state"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rng = np.random.default_rng(3)
    last = 0
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHECKPOINT_LOOP, str(FEATURES_YAML), str(folder)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
        )
        if last == 0:
            assert proc.stdout.readline().strip() == b"first"
        time.sleep(float(rng.uniform(0.2, 0.8)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
        state, positions = EmbeddedFeatureStore(folder, fs).load()
        assert positions["events"] == state.events_seen >= last
        assert state.lookup(f"u{(state.events_seen - 1) % 997}", state.max_ts + 1)["user_txn_count_1h"] >= 1
        last = positions["events"]
    assert last > 200
    assert not [p for p in folder.iterdir() if p.name != "window-state.arrow" and not p.name.endswith(".tmp")]


FAILING_WRITE = textwrap.dedent(
    """
    import json, resource, signal, sys
    from pathlib import Path
    from adapters.feature_store import EmbeddedFeatureStore, FeatureStoreError
    from mlops.features import FeatureSet, StreamFeatures
    from mlops.settings import load_settings

    fs = FeatureSet.from_settings(load_settings(sys.argv[1], environ={}))
    store = EmbeddedFeatureStore(Path(sys.argv[2]), fs)
    state = StreamFeatures(fs)
    t0 = 1_767_225_600_000_000_000
    for i in range(100):
        state.update(f"u{i}", t0 + i, {"amount": 1.0})
    store.save(state, {"events": 100})
    size = store.path.stat().st_size
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (size * 3, size * 3))
    for i in range(100, 5000):
        state.update(f"u{i}", t0 + i, {"amount": 1.0})
    try:
        store.save(state, {"events": 5000})
        error = None
    except FeatureStoreError as exc:
        error = str(exc)
    print(json.dumps({"error": error}))
    """
)


def test_a_checkpoint_that_fails_half_written_leaves_the_previous_one(tmp_path: Path, fs: FeatureSet) -> None:
    """When writing a checkpoint fails part-way (here: the file-size limit is hit), the save is a
    FeatureStoreError and the previous checkpoint is still there, whole, with its positions."""
    folder = tmp_path / "state"
    out = subprocess.run(
        [sys.executable, "-c", FAILING_WRITE, str(FEATURES_YAML), str(folder)],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    assert "cannot write window state" in json.loads(out.stdout)["error"]
    state, positions = EmbeddedFeatureStore(folder, fs).load()
    assert positions == {"events": 100} and state.events_seen == 100 and state.entities == 100
    assert [p.name for p in folder.iterdir()] == ["window-state.arrow"]


def test_the_configured_store_is_the_one_the_stream_uses(
    redis_url: str, tmp_path: Path, fs: FeatureSet
) -> None:
    """`features.store` picks the stream's state store: embedded by default, Redis by URL, with a
    key prefix per topic and group; a malformed URL or kind is a config error naming the field."""
    from flows.stream import state_store
    from mlops.errors import ConfigError

    env = {"MLOPS_HOME": str(tmp_path)}
    embedded = state_store(load_settings(FEATURES_YAML, environ=env), fs, "tx", "g1")
    assert isinstance(embedded, EmbeddedFeatureStore)
    assert embedded.folder == tmp_path.resolve() / "stream" / "state" / "tx" / "g1"

    env["MLOPS__FEATURES__STORE"] = f"{{kind: redis, url: '{redis_url}'}}"
    redis_store = state_store(load_settings(FEATURES_YAML, environ=env), fs, "tx", "g1")
    assert isinstance(redis_store, RedisFeatureStore) and redis_store.prefix == "mlops:features:tx:g1"
    state = StreamFeatures(fs)
    state.update("u1", 10**18, {"amount": 5.0})
    redis_store.save(state, {"tx": 1})
    assert redis_store.lookup("u1", 10**18 + 1)["user_amount_sum_24h"] == 5.0

    for bad, field in (
        ("{kind: redis, url: 'http://x'}", "features.store.redis.url"),
        ("{kind: s3}", "features.store"),
    ):
        with pytest.raises(ConfigError, match=field):
            load_settings(FEATURES_YAML, environ={"MLOPS__FEATURES__STORE": bad})
