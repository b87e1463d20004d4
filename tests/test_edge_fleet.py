"""Simulated devices against a real release repository: real Ed25519 keys, real files, real DuckDB.

Each attack puts a man in the middle between a device and the update server and checks that
the device refuses the bundle, logs why, reports it, and keeps serving the model it had.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from adapters.edge_fleet import Fleet, RepositoryServer, SimulatedDevice
from adapters.edge_store import ReleaseRepository, TelemetryStore
from mlops import modeling
from mlops.datagen import generate
from mlops.edge import graph
from mlops.edge.errors import EdgeError
from mlops.edge.manifest import open_envelope, sha256_hex, sign
from mlops.edge.release import with_cohort
from mlops.edge.telemetry import observe
from mlops.settings import Settings
from tasks import edge as t

MODEL = "fraud-detector"


@dataclass
class World:
    settings: Settings
    repo: ReleaseRepository
    server: RepositoryServer
    fleet: Fleet
    rows: pd.DataFrame
    v1: bytes
    v2: bytes

    def device(self, i: int = 0) -> SimulatedDevice:
        return self.fleet.device(f"dev-{i:05d}")

    def publish(self, model: bytes, cohort: float = 100.0) -> int:
        m = t.publish.fn(
            self.settings,
            model_name=MODEL,
            variant="v",
            model=model,
            rows=self.rows,
            device_classes=("pos-terminal",),
            min_runtime_version="1.20.0",
            source_version=1,
        )
        t.serve_cohort.fn(self.settings, MODEL, m.version, cohort)
        return m.version


@pytest.fixture
def world(home: Settings, small_model: bytes, tmp_path: Path) -> World:
    """Release v1 on every device (factory image); release v2 (same function, other bytes) served to 100%."""
    rows = modeling.features_frame(generate(400, seed=8), home.dataset)
    repo = ReleaseRepository(t.paths(home).repo)
    server = RepositoryServer(repo, t.key_store(home))
    fleet = Fleet(tmp_path / "fleet", home.dataset, rows, durable=False)
    w = World(home, repo, server, fleet, rows, small_model, graph.compact(small_model))
    assert w.publish(small_model, cohort=0.0) == 1
    keys = t.key_store(home)
    fleet.provision(
        4, MODEL, "pos-terminal", "1.32.0", keys.root_bytes(1), factory_model=small_model, factory_version=1
    )
    assert w.publish(w.v2) == 2
    return w


class Mitm:
    """A man in the middle: serves altered metadata or altered downloads, otherwise the real server."""

    def __init__(
        self,
        inner: RepositoryServer,
        release: bytes | None = None,
        download: bytes | io.RawIOBase | None = None,
        timestamp: bytes | None = None,
    ):
        self.inner, self._release, self._download, self._timestamp = inner, release, download, timestamp

    def roots_after(self, version: int) -> list[bytes]:
        return self.inner.roots_after(version)

    def timestamp(self, model: str) -> bytes | None:
        return self._timestamp if self._timestamp is not None else self.inner.timestamp(model)

    def release(self, model: str, sha256: str) -> bytes | None:
        return self._release if self._release is not None else self.inner.release(model, sha256)

    def download(self, model: str, version: int):
        if self._download is None:
            return self.inner.download(model, version)
        if isinstance(self._download, bytes):
            return io.BytesIO(self._download)
        return self._download


def assert_refused(
    w: World, device: SimulatedDevice, event: dict | None, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused with ``code``, logged with its reason, reported, and still serving v1 exactly as before."""
    assert event is not None and event["event"] == "rejected" and event["code"] == code
    again = w.fleet.device(device.device_id)  # re-read from disk
    assert again.state.current == {"version": 1, "sha256": sha256_hex(w.v1)}
    assert again.model_bytes() == w.v1
    expected = modeling_scores(w, w.v1)
    np.testing.assert_allclose(again.predict(w.rows.head(20)), expected, atol=1e-7)
    assert any(
        code in r.getMessage() and event["reason"] in r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING
    )
    assert again.outbox()[-1]["code"] == code


def modeling_scores(w: World, model: bytes) -> np.ndarray:
    from mlops.onnx_model import OnnxScorer

    return OnnxScorer(model, w.settings.dataset).predict_proba(w.rows.head(20))


NOW = lambda: datetime.now(UTC)  # noqa: E731


def test_a_good_release_is_installed_atomically_keeping_the_previous_model(world: World) -> None:
    """Verify, download, write under its hash, commit state.json naming it current and v1 previous, health-check, report."""
    d = world.device()
    event = d.poll(world.server, NOW())
    assert event is not None and event["event"] == "installed" and event["release_version"] == 2
    d = world.fleet.device(d.device_id)
    assert d.state.current == {"version": 2, "sha256": sha256_hex(world.v2)}
    assert d.state.previous == {"version": 1, "sha256": sha256_hex(world.v1)}
    assert d.model_bytes("previous") == world.v1 and d.model_bytes() == world.v2
    assert event["latency_p99_ms"] > 0 and sum(event["prediction_counts"]) == world.settings.edge.traffic_rows
    assert d.poll(world.server, NOW()) is None  # up to date: nothing to do, nothing to report


def test_tampered_model_bytes_are_refused(world: World, caplog: pytest.LogCaptureFixture) -> None:
    bad = bytearray(world.v2)
    bad[len(bad) // 2] ^= 0xFF
    d = world.device()
    assert_refused(world, d, d.poll(Mitm(world.server, download=bytes(bad)), NOW()), "hash", caplog)


def test_a_truncated_download_is_refused(world: World, caplog: pytest.LogCaptureFixture) -> None:
    d = world.device()
    assert_refused(world, d, d.poll(Mitm(world.server, download=world.v2[:-100]), NOW()), "length", caplog)


def test_a_release_signed_with_the_wrong_key_is_refused(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    signed, _ = open_envelope(world.repo.served(MODEL))
    forged = sign(signed, [Ed25519PrivateKey.generate()])
    d = world.device()
    assert_refused(world, d, d.poll(Mitm(world.server, release=forged), NOW()), "signature", caplog)


def test_metadata_altered_after_signing_is_refused(world: World, caplog: pytest.LogCaptureFixture) -> None:
    """Pointing a genuinely signed release at other bytes (new hash and length) breaks its signature."""
    env = json.loads(world.repo.served(MODEL))
    evil = b"evil model"
    env["signed"]["target"] |= {"sha256": sha256_hex(evil), "length": len(evil)}
    d = world.device()
    event = d.poll(Mitm(world.server, release=json.dumps(env).encode(), download=evil), NOW())
    assert_refused(world, d, event, "signature", caplog)


def test_an_older_release_is_refused_as_a_rollback_attack(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """After v2, a replay of v1's genuine (and unexpired) metadata is refused: versions never go backwards."""
    d = world.device()
    assert d.poll(world.server, NOW())["event"] == "installed"  # type: ignore[index]
    old, _ = open_envelope(world.repo.release_metadata(MODEL, 1))
    replay = t.key_store(world.settings).sign(with_cohort(old, 100.0, NOW(), 24))
    event = d.poll(Mitm(world.server, release=replay), NOW())
    assert event is not None and event["code"] == "rollback" and "older than v2" in event["reason"]
    d = world.fleet.device(d.device_id)
    assert d.state.current == {"version": 2, "sha256": sha256_hex(world.v2)} and d.model_bytes() == world.v2
    assert any("rollback" in r.getMessage() for r in caplog.records)


def test_an_expired_release_is_refused_as_a_freeze_attack(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Metadata replayed after its expiry is refused even though its signature is genuine."""
    d = world.device()
    later = NOW() + timedelta(hours=world.settings.edge.manifest_ttl_hours + 1)
    assert_refused(world, d, d.poll(world.server, later), "expired", caplog)


def test_a_model_failing_its_health_check_falls_back_to_the_previous_model(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A signed, intact release whose model answers NaN is swapped in, fails the golden check, and is swapped out."""
    d = world.device()
    bad_version = world.publish(graph.with_output_transform(world.v1, "nan"))
    event = d.poll(world.server, NOW())
    assert event is not None and event["event"] == "health_failed" and "non-finite" in event["reason"]
    d = world.fleet.device(d.device_id)
    assert d.state.current == {"version": 1, "sha256": sha256_hex(world.v1)}
    assert d.state.failed_versions == (bad_version,) and d.state.highest_version == bad_version
    assert np.isfinite(d.predict(world.rows.head(5))).all()
    assert d.poll(world.server, NOW()) is None  # it does not retry a release that failed here
    assert any("failed its health check" in r.getMessage() for r in caplog.records)


def test_a_crash_before_the_state_commit_leaves_the_old_model_serving(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """state.json is the commit point: killed after the download but before the swap, the device still runs v1,
    and the next poll completes the update."""
    d = world.device()
    commit = SimulatedDevice._commit

    def crash(self: SimulatedDevice) -> None:
        if self.state.current and self.state.current["version"] == 2:  # the swap's commit
            raise KeyboardInterrupt("power cut")
        commit(self)  # e.g. remembering the newest timestamp

    monkeypatch.setattr(SimulatedDevice, "_commit", crash)
    with pytest.raises(KeyboardInterrupt):
        d.poll(world.server, NOW())
    monkeypatch.undo()
    assert (d.folder / "models" / f"{sha256_hex(world.v2)}.onnx").read_bytes() == world.v2  # downloaded
    d = world.fleet.device(d.device_id)
    assert d.state.current == {"version": 1, "sha256": sha256_hex(world.v1)} and d.model_bytes() == world.v1
    assert d.poll(world.server, NOW())["event"] == "installed"  # type: ignore[index]


def test_devices_follow_a_key_rotation_and_then_refuse_the_old_key(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """After `keys rotate`, devices walk root v1 -> v2, install releases signed by the new key,
    and refuse anything the retired key signs."""
    keys = t.key_store(world.settings)
    retired = keys.signing_keys()
    old_root, new_root, _ = t.rotate_keys(world.settings)
    assert new_root.version == old_root.version + 1
    assert set(new_root.keyids("release")).isdisjoint(old_root.keyids("release"))
    assert new_root.keyids("root") == old_root.keyids("root")
    d = world.device()
    assert d.poll(world.server, NOW())["event"] == "installed"  # type: ignore[index]
    assert json.loads(world.fleet.device(d.device_id).state.root)["signed"]["version"] == new_root.version
    signed, _ = open_envelope(world.repo.served(MODEL))
    by_old_key = sign(signed | {"version": 9}, retired)
    other = world.device(1)
    event = other.poll(Mitm(world.server, release=by_old_key), NOW())
    assert_refused(world, other, event, "signature", caplog)


def test_rotating_keys_re_signs_what_is_served_so_devices_keep_accepting_it(world: World) -> None:
    """Right after `keys rotate` (release key, and root key too), before any new publish, a device
    that fetches the new root installs the release served: it was re-signed by the new key."""
    for rotate_root in (False, True):
        old_root, new_root, served = t.rotate_keys(world.settings, root=rotate_root)
        assert served == [(MODEL, 2)]
        if rotate_root:
            assert set(new_root.keyids("root")).isdisjoint(old_root.keyids("root"))
    d = world.device()
    event = d.poll(world.server, NOW())
    assert event is not None and event["event"] == "installed", event
    assert json.loads(d.state.root)["signed"]["version"] == 3


def test_publishing_needs_only_the_online_key_and_the_root_key_signs_no_release(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the root key taken offline, publishing and widening a cohort still work; a rotation
    says the root key is missing; a release signed by the root key itself is refused by devices."""
    keys = t.key_store(world.settings)
    offline = tmp_path / "usb-stick"
    keys.offline.rename(offline)
    assert any(keys.online.glob("*.pem")) and keys.online != keys.offline
    v3 = world.publish(graph.with_output_transform(world.v1, "sqrt"))
    assert v3 == 3
    with pytest.raises(EdgeError, match="root key .* is not in"):
        t.rotate_keys(world.settings)
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    [pem] = offline.glob("*.pem")
    root_key = load_pem_private_key(pem.read_bytes(), password=None)
    signed, _ = open_envelope(world.repo.served(MODEL))
    by_root_key = sign(signed, [root_key])  # type: ignore[list-item]
    d = world.device()
    assert_refused(world, d, d.poll(Mitm(world.server, release=by_root_key), NOW()), "signature", caplog)


def test_a_superseded_release_replayed_to_a_device_that_never_saw_the_newer_one_is_refused(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """v2 is rolled back by v3 while device 0 is offline; a mirror then serves it v2's genuine,
    unexpired metadata (newer than its v1): the current timestamp names v3, so v2 is refused."""
    v2_metadata = world.repo.served(MODEL)
    v2_timestamp = world.repo.timestamp(MODEL)
    assert world.publish(world.v1) == 3  # the rollback release: v1's bytes under a new version
    d = world.device()
    event = d.poll(Mitm(world.server, release=v2_metadata), NOW())
    assert_refused(world, d, event, "superseded", caplog)
    assert "names v3" in event["reason"]  # type: ignore[index]
    # the old timestamp that named v2 is refused once it expires...
    stale = NOW() + timedelta(hours=world.settings.edge.timestamp_ttl_hours, minutes=1)
    event = d.poll(Mitm(world.server, release=v2_metadata, timestamp=v2_timestamp), stale)
    assert_refused(world, d, event, "expired", caplog)
    assert "timestamp" in event["reason"]  # type: ignore[index]
    # ...and at once by a device that has seen the newer timestamp
    other = world.device(1)
    assert other.poll(world.server, NOW())["event"] == "adopted"  # type: ignore[index]
    event = other.poll(Mitm(world.server, release=v2_metadata, timestamp=v2_timestamp), NOW())
    assert event is not None and event["code"] == "rollback" and "timestamp" in event["reason"]


def test_release_metadata_is_fetched_only_by_the_hash_the_timestamp_names(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a timestamp a device fetches nothing (as when offline) and keeps v1; with one, it
    asks for the metadata by the sha256 the timestamp names, and refuses if that is not served."""

    class NoTimestamp(Mitm):
        def timestamp(self, model: str) -> bytes | None:
            return None

    d = world.device()
    assert d.poll(NoTimestamp(world.server), NOW()) is None
    assert world.fleet.device(d.device_id).state.current == {"version": 1, "sha256": sha256_hex(world.v1)}
    for snapshot in (world.repo.folder / MODEL / "snapshots").glob("*.json"):
        snapshot.unlink()
    assert_refused(world, d, d.poll(world.server, NOW()), "missing", caplog)


def test_publishing_keeps_the_last_snapshots_so_a_device_reading_the_previous_timestamp_is_served(
    world: World,
) -> None:
    """Consistent snapshots: each served release stays fetchable by hash for a few more publishes."""
    first = world.repo.served(MODEL)
    assert first is not None
    for _ in range(3):
        t.serve_cohort.fn(world.settings, MODEL, 2, 100.0)
    assert world.repo.served(MODEL, sha256_hex(first)) == first
    assert world.repo.served(MODEL, "../../etc/passwd") is None


@pytest.mark.parametrize(
    "data",
    [
        b'{"signed": {"version": NaN}, "signatures": []}',
        b'{"signed": {"version": ' + b"9" * 5000 + b'}, "signatures": []}',
        b'{"signed": ' + b"[" * 100_000 + b"]" * 100_000 + b', "signatures": []}',
        b"[" * 10_000_000,
    ],
    ids=["nan", "huge-integer", "deep-nesting", "oversized"],
)
@pytest.mark.parametrize("where", ["release", "timestamp"])
def test_hostile_metadata_is_refused_and_the_device_keeps_running(
    world: World, caplog: pytest.LogCaptureFixture, data: bytes, where: str
) -> None:
    """NaN, huge integers, deep nesting and oversized documents, as release metadata or as the
    timestamp, end the poll in a refusal with a reason; the device keeps serving v1."""
    d = world.device()
    event = d.poll(Mitm(world.server, **{where: data}), NOW())
    assert_refused(world, d, event, "malformed", caplog)


class Endless(io.RawIOBase):
    """A download that never ends; counts what the device read."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        n = len(buffer)
        buffer[:n] = b"\0" * n
        self.read_bytes += n
        return n


def test_an_endless_download_is_cut_off_at_the_signed_length(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The length is enforced while reading: the device stops one chunk past the signed length."""
    d = world.device()
    endless = Endless()
    event = d.poll(Mitm(world.server, download=endless), NOW())
    assert_refused(world, d, event, "length", caplog)
    assert len(world.v2) < endless.read_bytes <= len(world.v2) + 1
    assert not [p for p in (d.folder / "models").iterdir() if p.name.startswith(".")]  # no partial file left


def test_state_naming_a_model_is_on_disk_before_the_model_it_replaced_is_deleted(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Power-cut safety: the new model file's rename and then state.json's are made durable by an
    fsync of their folders before any model that the new state no longer names is unlinked."""
    fleet = Fleet(tmp_path / "durable", world.settings.dataset, world.rows, durable=True)
    keys = t.key_store(world.settings)
    fleet.provision(1, MODEL, "pos-terminal", "1.32.0", keys.root_bytes(1), world.v1, 1)
    device = fleet.device("dev-00000")
    assert device.poll(world.server, NOW())["event"] == "installed"  # type: ignore[index]  # v1 kept as previous
    world.publish(graph.with_output_transform(world.v1, "sqrt"))

    ops: list[tuple[str, str]] = []
    real_fsync, real_replace, real_unlink = os.fsync, os.replace, os.unlink

    def fsync(fd: int) -> None:
        ops.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, **kw) -> None:  # type: ignore[no-untyped-def]
        real_replace(src, dst, **kw)
        ops.append(("replace", str(dst)))

    def unlink(path, **kw) -> None:  # type: ignore[no-untyped-def]
        ops.append(("unlink", str(path)))
        real_unlink(path, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)
    event = fleet.device("dev-00000").poll(world.server, NOW())
    monkeypatch.undo()
    assert event is not None and event["event"] == "installed", event

    folder = str(device.folder)
    old_model = f"{folder}/models/{sha256_hex(world.v1)}.onnx"
    deleted = ops.index(("unlink", old_model))
    new_model = next(
        i for i, op in enumerate(ops) if op[0] == "replace" and op[1].startswith(f"{folder}/models/")
    )
    assert ("fsync", f"{folder}/models") in ops[new_model:deleted]
    last_state = max(i for i, op in enumerate(ops[:deleted]) if op == ("replace", f"{folder}/state.json"))
    assert ("fsync", folder) in ops[last_state:deleted]


def test_telemetry_is_stored_in_duckdb_and_kept_on_the_device_until_acknowledged(world: World) -> None:
    """Store and forward: events stay in a device's outbox until the collector stores them, so none are lost."""
    store = TelemetryStore(t.paths(world.settings).telemetry)
    events = world.fleet.poll(world.server, NOW())
    assert len(events) == 4 and all(e["event"] == "installed" for e in events)
    assert len(world.fleet.poll(world.server, NOW())) == 4  # not acknowledged: sent again
    store.append([e | {"fleet": "f", "rollout_id": "r1"} for e in events])
    world.fleet.ack(events)
    assert world.fleet.poll(world.server, NOW()) == []
    stored = store.events(rollout_id="r1")
    assert len(stored) == 4 and stored[0]["prediction_counts"] and isinstance(stored[0]["ts"], datetime)
    obs = observe(stored, world.fleet.device_ids(), version=2, percent=100.0)
    assert (obs.targeted, obs.reported, obs.failed, obs.serving) == (4, 4, 0, 4)
    assert obs.predictions == 4 * world.settings.edge.traffic_rows


_HOLD_TELEMETRY = """
import sys, time
from pathlib import Path
from adapters.warehouse import Warehouse
path = Path(sys.argv[1])
with Warehouse.at(path.parent, path.name).writer(10) as work:
    work.con.execute("INSERT OR REPLACE INTO rollouts VALUES ('r9', 'f', 'm', 3, 'canary', 10, now()::TIMESTAMP, '{}')")
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _event(rollout_id: str, device: str = "d") -> dict:
    return {"ts": NOW().isoformat(), "fleet": "f", "rollout_id": rollout_id, "device_id": device}


def test_telemetry_readers_and_writers_wait_for_another_process_writing(tmp_path: Path) -> None:
    """While another process writes telemetry.duckdb (a rollout flow), ``mlops edge status`` and
    the flow's own reads wait for its write and then see it; a writer that never finishes gives
    a one-line error naming the file after the timeout."""
    path = tmp_path / "edge" / "telemetry.duckdb"
    TelemetryStore(path).rollouts()  # creates the file and its tables
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))

    def hold(seconds: float) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", _HOLD_TELEMETRY, str(path), str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        return proc

    holder = hold(1.0)
    try:
        assert [r["rollout_id"] for r in TelemetryStore(path, lock_timeout=20).rollouts()] == ["r9"]
    finally:
        holder.wait(30)
    holder = hold(3.0)
    try:
        with pytest.raises(
            EdgeError, match=r"^telemetry store .*telemetry.duckdb stayed locked by another process for 0s$"
        ):
            TelemetryStore(path, lock_timeout=0.3).event_counts("r9")
        event = _event("r9") | {"model": "m", "event": "installed"}
        TelemetryStore(path, lock_timeout=20).append([event])
    finally:
        holder.wait(30)
    assert TelemetryStore(path).event_counts("r9") == {"installed": 1}


_APPEND_FOREVER = """
import sys
from pathlib import Path
from adapters.edge_store import TelemetryStore
store = TelemetryStore(Path(sys.argv[1]))
batch = [
    {"ts": "2026-01-01T00:00:00", "fleet": "f", "rollout_id": "k", "device_id": f"d{i}",
     "model": "m", "event": "installed", "prediction_counts": list(range(20))}
    for i in range(50)
]
n = 0
while True:
    store.append(batch)
    n += 1
    print(n, flush=True)
"""


@pytest.mark.slow
def test_a_writer_killed_at_any_moment_leaves_the_telemetry_readable_and_whole(tmp_path: Path) -> None:
    """A process appending batches of 50 events, SIGKILLed at random moments eight times,
    leaves a file that opens, holds a whole number of batches (at least every acknowledged
    one), and takes the next append."""
    path = tmp_path / "edge" / "telemetry.duckdb"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    rng = np.random.default_rng(5)
    acknowledged = 0
    for _ in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", _APPEND_FOREVER, str(path)], stdout=subprocess.PIPE, text=True, env=env
        )
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        assert first == "1", first
        acknowledged += 1
        time.sleep(float(rng.uniform(0.0, 0.4)))
        proc.send_signal(signal.SIGKILL)
        acknowledged += sum(1 for line in proc.stdout.read().splitlines() if line.strip())
        proc.wait(10)
        n = TelemetryStore(path).event_counts("k").get("installed", 0)
        assert n % 50 == 0 and n >= 50 * acknowledged, (n, acknowledged)
        assert n <= 50 * (acknowledged + 1)
    TelemetryStore(path).append([_event("after") | {"model": "m", "event": "installed"}])
    assert TelemetryStore(path).event_counts("after") == {"installed": 1}
    assert not list(path.parent.glob(".telemetry.duckdb.*")), "a killed writer's working copy was left"
