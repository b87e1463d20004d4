"""Simulated devices against a real release repository: real Ed25519 keys, real files, real DuckDB.

Each attack puts a man in the middle between a device and the update server and checks that
the device refuses the bundle, logs why, reports it, and keeps serving the model it had.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
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

    def __init__(self, inner: RepositoryServer, release: bytes | None = None, download: bytes | None = None):
        self.inner, self._release, self._download = inner, release, download

    def roots_after(self, version: int) -> list[bytes]:
        return self.inner.roots_after(version)

    def release(self, model: str) -> bytes | None:
        return self._release if self._release is not None else self.inner.release(model)

    def download(self, model: str, version: int) -> bytes:
        return self._download if self._download is not None else self.inner.download(model, version)


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

    def crash(self: SimulatedDevice) -> None:
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(SimulatedDevice, "_commit", crash)
    with pytest.raises(KeyboardInterrupt):
        d.poll(world.server, NOW())
    monkeypatch.undo()
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
    old_root, new_root = keys.rotate()
    assert new_root.version == old_root.version + 1 and set(new_root.keys).isdisjoint(old_root.keys)
    d = world.device()
    t.serve_cohort.fn(world.settings, MODEL, 2, 100.0)  # re-signed with the new key
    assert d.poll(world.server, NOW())["event"] == "installed"  # type: ignore[index]
    assert json.loads(world.fleet.device(d.device_id).state.root)["signed"]["version"] == new_root.version
    signed, _ = open_envelope(world.repo.served(MODEL))
    by_old_key = sign(signed | {"version": 9}, retired)
    other = world.device(1)
    event = other.poll(Mitm(world.server, release=by_old_key), NOW())
    assert_refused(world, other, event, "signature", caplog)


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
import duckdb
con = duckdb.connect(sys.argv[1])
con.execute("INSERT OR REPLACE INTO rollouts VALUES ('r9', 'f', 'm', 3, 'canary', 10, now()::TIMESTAMP, '{}')")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


def test_telemetry_readers_and_writers_wait_for_another_process_holding_the_file(tmp_path: Path) -> None:
    """While another process has telemetry.duckdb open (a rollout flow writing), ``mlops edge
    status`` and the flow's own reads wait for it instead of failing on DuckDB's lock; a
    holder that never lets go gets a one-line error naming the file after the timeout."""
    path = tmp_path / "edge" / "telemetry.duckdb"
    TelemetryStore(path).rollouts()  # creates the file and its tables

    def hold(seconds: float) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", _HOLD_TELEMETRY, str(path), str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        return proc

    holder = hold(1.0)
    try:
        # Without waiting this read fails at once: the holder has the file until it exits.
        assert [r["rollout_id"] for r in TelemetryStore(path, lock_timeout=20).rollouts()] == ["r9"]
    finally:
        holder.wait(30)
    holder = hold(3.0)
    try:
        with pytest.raises(
            EdgeError, match=r"telemetry store .*telemetry.duckdb stayed locked by another process for 0s"
        ):
            TelemetryStore(path, lock_timeout=0.3).event_counts("r9")
        TelemetryStore(path, lock_timeout=20).append(
            [
                {
                    "ts": NOW().isoformat(),
                    "fleet": "f",
                    "rollout_id": "r9",
                    "device_id": "d",
                    "model": "m",
                    "event": "installed",
                }
            ]
        )
    finally:
        holder.wait(30)
    assert TelemetryStore(path).event_counts("r9") == {"installed": 1}
