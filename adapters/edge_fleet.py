"""A simulated device fleet: each device polls for releases, verifies, swaps, checks and reports.

A ``SimulatedDevice`` is a folder (``state.json`` plus content-addressed model files) and
the update cycle a real device would run, with every decision taken by the pure rules in
``mlops.edge.manifest``:

1. fetch newer root metadata and walk the key-rotation chain from the pinned root;
2. fetch the timestamp, verify it with the release keys, refuse it if expired or older than
   the newest one this device accepted (remembered in ``state.json``);
3. fetch the release metadata the timestamp names, by its sha256 (consistent snapshots:
   a publish in progress never hands a device a mismatched pair), size-limited and
   strictly parsed, and verify its signature with the release keys;
4. ``decide_update``: expiry, version monotonicity, device class, runtime, cohort; then
   ``check_snapshot``: the release must be the exact one the timestamp names (a superseded
   release replayed by a mirror or a man in the middle is refused);
5. download in chunks, checking length (cut off past the signed length) and sha256 against
   the signed target while reading;
6. swap atomically: the model file is written under its sha256 (temp file, fsync, rename,
   fsync of the folder), then ``state.json`` (the commit point) is replaced to name it
   current and keep the old model as previous, and the folder fsynced, before any model
   that state no longer names is deleted;
7. health-check the new model on the golden inputs the release carries (loads, finite
   probabilities, equal to the publisher's within tolerance); on failure commit the
   previous model back as current;
8. report telemetry: the event, the version it serves, single-row latency and a histogram
   of its predictions on the device's own traffic. Events wait in the device's outbox
   until the collector acknowledges them (store and forward), so a telemetry sink that is
   down loses nothing: the next poll sends them again.

Any refusal is logged with its reason and reported, and the device keeps serving its
current model. The ``UpdateServer`` protocol is what a device talks to; the real one reads
the release repository, and tests put an attacker in between.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import pandas as pd

from adapters.edge_store import KeyStore, ReleaseRepository
from adapters.files import atomic_write, fsync_dir
from mlops.edge import manifest as rules
from mlops.edge.errors import EdgeError, MetadataInvalid, SignatureInvalid
from mlops.edge.telemetry import histogram
from mlops.errors import DataError, ModelError
from mlops.onnx_model import OnnxScorer
from mlops.settings import DatasetSchema

log = logging.getLogger("mlops.edge.device")


DOWNLOAD_CHUNK = 1 << 16


class UpdateServer(Protocol):
    """What a device can ask the update server for."""

    def roots_after(self, version: int) -> list[bytes]:
        """Root metadata newer than ``version``, ascending."""
        ...

    def timestamp(self, model: str) -> bytes | None:
        """The current timestamp of ``model``."""
        ...

    def release(self, model: str, sha256: str) -> bytes | None:
        """The release metadata of ``model`` whose sha256 the timestamp names."""
        ...

    def download(self, model: str, version: int) -> BinaryIO:
        """The model file of a release, as a stream the device reads (and closes) itself."""
        ...


class RepositoryServer:
    """The real update server: the key store's root chain and the release repository."""

    def __init__(self, repo: ReleaseRepository, keys: KeyStore):
        self.repo = repo
        self.keys = keys

    def roots_after(self, version: int) -> list[bytes]:
        """Root metadata newer than ``version``, ascending."""
        return [self.keys.root_bytes(v) for v in self.keys.root_versions() if v > version]

    def timestamp(self, model: str) -> bytes | None:
        """The current timestamp of ``model``."""
        return self.repo.timestamp(model)

    def release(self, model: str, sha256: str) -> bytes | None:
        """The release metadata of ``model`` whose sha256 the timestamp names."""
        return self.repo.served(model, sha256)

    def download(self, model: str, version: int) -> BinaryIO:
        """The model file of a release, opened for streaming."""
        return self.repo.open_model(model, version)


class ScorerCache:
    """What the simulated devices of one process can share without sharing trust.

    ONNX Runtime sessions by model sha256 (devices reach a session only through bytes whose
    sha256 they verified, so equal keys mean equal models), and the results of pure
    functions of the same inputs: verifying the same metadata bytes under the same root,
    the golden frame of a release, the traffic features. Every device still runs every
    check; a thousand simulated devices just do not redo identical arithmetic.
    """

    def __init__(self, schema: DatasetSchema, size: int = 8):
        self.schema = schema
        self.size = size
        self._cache: OrderedDict[str, OnnxScorer] = OrderedDict()
        self._pure: OrderedDict[tuple[str, ...], Any] = OrderedDict()

    def memo(self, key: tuple[str, ...], compute: Any) -> Any:
        """``compute()`` once per key (kept for the last few keys); exceptions are not cached."""
        if key in self._pure:
            self._pure.move_to_end(key)
            return self._pure[key]
        value = compute()
        self._pure[key] = value
        if len(self._pure) > 32:
            self._pure.popitem(last=False)
        return value

    def get(self, sha256: str, model: bytes) -> OnnxScorer:
        """The session of the model with this sha256, built from ``model`` on a miss (``size`` are kept)."""
        if sha256 in self._cache:
            self._cache.move_to_end(sha256)
            return self._cache[sha256]
        scorer = OnnxScorer(model, self.schema)
        self._cache[sha256] = scorer
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return scorer


def golden_frame(golden: rules.Golden) -> pd.DataFrame:
    """A release's golden inputs as a frame the scorer reads."""
    return pd.DataFrame({k: list(v) for k, v in golden.inputs.items()})


def _digest(data: bytes | str) -> str:
    return rules.sha256_hex(data.encode() if isinstance(data, str) else data)


@dataclass
class DeviceState:
    """What a device keeps in ``state.json`` across restarts.

    Who it is, its pinned root, its current and previous model, the newest release and
    timestamp versions it accepted and the versions that failed on it, so it never goes back.
    """

    device_id: str
    device_class: str
    runtime_version: str
    model: str
    root: str  # the pinned root metadata envelope
    current: dict[str, Any] | None = None  # {"version", "sha256"}
    previous: dict[str, Any] | None = None
    highest_version: int = 0
    failed_versions: tuple[int, ...] = ()
    timestamp_version: int = 0  # newest timestamp accepted: older ones are refused

    def view(self) -> rules.DeviceView:
        """This state as the pure update rules see it."""

        def inst(d: dict[str, Any] | None) -> rules.Installed | None:
            return None if d is None else rules.Installed(int(d["version"]), str(d["sha256"]))

        return rules.DeviceView(
            self.device_id,
            self.device_class,
            self.runtime_version,
            self.model,
            inst(self.current),
            inst(self.previous),
            self.highest_version,
            frozenset(self.failed_versions),
            self.timestamp_version,
        )


class SimulatedDevice:
    """One device: its folder, its pinned keys, its models and its update cycle."""

    def __init__(
        self,
        folder: Path,
        scorers: ScorerCache,
        traffic: pd.DataFrame,
        traffic_rows: int = 64,
        latency_calls: int = 4,
        durable: bool = True,
    ):
        self.folder = folder
        self.scorers = scorers
        self.traffic = traffic
        self.traffic_rows = traffic_rows
        self.latency_calls = latency_calls
        self.durable = durable
        self.state = self._read()

    # ----------------------------------------------------------------- state

    @classmethod
    def provision(
        cls,
        folder: Path,
        state: DeviceState,
        scorers: ScorerCache,
        traffic: pd.DataFrame,
        model: bytes | None = None,
        version: int = 0,
        durable: bool = True,
    ) -> SimulatedDevice:
        """A factory-fresh device with pinned root keys and, optionally, a first model."""
        folder.mkdir(parents=True, exist_ok=True)
        if model is not None:
            sha = rules.sha256_hex(model)
            atomic_write(folder / "models" / f"{sha}.onnx", model, mode=0o644, durable=durable)
            state.current = {"version": version, "sha256": sha}
            state.highest_version = version
        atomic_write(folder / "state.json", json.dumps(state.__dict__).encode(), mode=0o644, durable=durable)
        return cls(folder, scorers, traffic, durable=durable)

    def _read(self) -> DeviceState:
        try:
            data = json.loads((self.folder / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EdgeError(f"device state {self.folder / 'state.json'} cannot be read: {exc}") from None
        data["failed_versions"] = tuple(data.get("failed_versions", ()))
        return DeviceState(**data)

    def _commit(self) -> None:
        """``state.json`` is the commit point of every swap.

        ``atomic_write`` fsyncs the folder after the rename, so the new state is on disk
        before a model file it no longer names is deleted: after a power cut the device
        finds a state whose models are all there.
        """
        atomic_write(
            self.folder / "state.json",
            json.dumps(self.state.__dict__).encode(),
            mode=0o644,
            durable=self.durable,
        )
        keep = {m["sha256"] for m in (self.state.current, self.state.previous) if m}
        for f in (self.folder / "models").glob("*.onnx"):
            if f.stem not in keep:
                f.unlink(missing_ok=True)

    @property
    def device_id(self) -> str:
        """The id the device reports under."""
        return self.state.device_id

    def model_bytes(self, which: str = "current") -> bytes | None:
        """The ONNX file of the ``current`` (or ``previous``) model; None when that slot is empty."""
        slot = self.state.current if which == "current" else self.state.previous
        return None if slot is None else (self.folder / "models" / f"{slot['sha256']}.onnx").read_bytes()

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Serve: probabilities from the current model."""
        if self.state.current is None:
            raise ModelError(f"{self.device_id} has no model")
        data = self.model_bytes()
        assert data is not None
        return self.scorers.get(self.state.current["sha256"], data).predict_proba(frame)

    # ----------------------------------------------------------------- update cycle

    def _event(self, event: str, code: str, reason: str, release: int | None, **extra: Any) -> dict[str, Any]:
        cur = self.state.current
        record = {
            "ts": datetime.now(UTC).replace(tzinfo=None).isoformat(),
            "device_id": self.device_id,
            "model": self.state.model,
            "event": event,
            "code": code,
            "reason": reason,
            "release_version": release,
            "running_version": cur["version"] if cur else None,
            "running_sha256": cur["sha256"] if cur else None,
        } | extra
        atomic_write(
            self._outbox, json.dumps([*self.outbox(), record]).encode(), mode=0o644, durable=self.durable
        )
        return record

    @property
    def _outbox(self) -> Path:
        return self.folder / "outbox.json"

    def outbox(self) -> list[dict[str, Any]]:
        """Telemetry events not yet acknowledged by the collector."""
        try:
            return list(json.loads(self._outbox.read_text()))
        except FileNotFoundError:
            return []
        except (OSError, json.JSONDecodeError) as exc:
            raise EdgeError(f"{self._outbox}: cannot be read ({exc})") from None

    def ack(self) -> None:
        """The collector stored every event in the outbox."""
        self._outbox.unlink(missing_ok=True)

    def _reject(self, code: str, reason: str, release: int | None) -> dict[str, Any]:
        running = f"v{self.state.current['version']}" if self.state.current else "no model"
        log.warning(
            "%s rejected release%s: %s: %s; keeps serving %s",
            self.device_id,
            f" v{release}" if release else "",
            code,
            reason,
            running,
        )
        return self._event("rejected", code, reason, release)

    def _root(self, server: UpdateServer, now: datetime) -> rules.RootMeta:
        pinned = self.scorers.memo(
            ("root", _digest(self.state.root)), lambda: rules.parse_root(self.state.root.encode())[0]
        )
        newer = server.roots_after(pinned.version)
        if not newer:
            return rules.update_root(pinned, [], now)  # expiry check
        key = ("chain", _digest(self.state.root), *(_digest(b) for b in newer), now.isoformat())
        root = self.scorers.memo(key, lambda: rules.update_root(pinned, newer, now))
        if root.version != pinned.version:
            self.state.root = newer[-1].decode()
            self._commit()
            log.info("%s trusts root v%d now (keys %s)", self.device_id, root.version, ", ".join(root.keys))
        return root

    def poll(self, server: UpdateServer, now: datetime) -> dict[str, Any] | None:
        """One update cycle; the telemetry event it produced (None: nothing happened)."""
        try:
            root = self._root(server, now)
        except (SignatureInvalid, MetadataInvalid) as exc:
            return self._reject("root", str(exc), None)
        stamp = server.timestamp(self.state.model)
        if stamp is None:
            return None  # nothing published yet (a release without a timestamp is never fetched)
        root_digest = _digest(root.model_dump_json())
        try:
            ts = self.scorers.memo(
                ("timestamp", _digest(stamp), root_digest), lambda: rules.verified_timestamp(stamp, root)
            )
        except SignatureInvalid as exc:
            return self._reject("signature", f"timestamp: {exc}", None)
        except MetadataInvalid as exc:
            return self._reject("malformed", str(exc), None)
        bad = rules.check_timestamp(ts, self.state.view(), now)
        if bad is not None:
            return self._reject(bad.code, bad.reason, ts.release.version)
        if ts.version > self.state.timestamp_version:
            self.state.timestamp_version = ts.version
            self._commit()
        data = server.release(self.state.model, ts.release.sha256)
        if data is None:
            return self._reject(
                "missing",
                f"the release metadata the timestamp names (v{ts.release.version}) is not served",
                None,
            )
        try:
            key = ("release", _digest(data), root_digest)
            release = self.scorers.memo(key, lambda: rules.verified_manifest(data, root))
        except SignatureInvalid as exc:
            return self._reject("signature", str(exc), _claimed_version(data))
        except MetadataInvalid as exc:
            return self._reject("malformed", str(exc), _claimed_version(data))
        decision = rules.decide_update(release, self.state.view(), now)
        if decision.rejected:
            return self._reject(decision.code, decision.reason, release.version)
        if decision.action == "noop":
            return None
        stale = rules.check_snapshot(data, release, ts)
        if stale is not None:
            return self._reject(stale.code, stale.reason, release.version)
        if decision.action == "install":
            bad = self._download(server, release)
            if bad is not None:
                return self._reject(bad.code, bad.reason, release.version)
        return self._swap(release, decision)

    def _download(self, server: UpdateServer, release: rules.ModelManifest) -> rules.UpdateDecision | None:
        """Stream the target into ``models/<sha256>.onnx``, checked while read; the rejection if any.

        Never reads more than one chunk past the signed length, never keeps the whole file
        in memory, and never gives the file its final name unless length and sha256 match.
        """
        models = self.folder / "models"
        models.mkdir(parents=True, exist_ok=True)
        final = models / f"{release.target.sha256}.onnx"
        tmp = models / f".{release.target.sha256}.{os.getpid()}.download"
        check = rules.DownloadCheck(release.target)
        bad: rules.UpdateDecision | None = None
        try:
            with server.download(release.model, release.version) as stream, open(tmp, "wb") as out:
                while True:
                    chunk = stream.read(check.wanted(DOWNLOAD_CHUNK))
                    if not chunk:
                        break
                    bad = check.feed(chunk)
                    if bad is not None:
                        break
                    out.write(chunk)
                if bad is None:
                    bad = check.finish()
                if bad is None and self.durable:
                    out.flush()
                    os.fsync(out.fileno())
        except (OSError, EdgeError) as exc:
            bad = rules.UpdateDecision("reject", "download", f"download failed: {exc}")
        if bad is not None:
            tmp.unlink(missing_ok=True)
            return bad
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
        if self.durable:
            fsync_dir(models)
        return None

    def _swap(self, release: rules.ModelManifest, decision: rules.UpdateDecision) -> dict[str, Any]:
        before_current, before_previous = self.state.current, self.state.previous
        new = {"version": release.version, "sha256": release.target.sha256}
        if decision.action == "adopt":  # same bytes under a newer version
            self.state.current = new
        else:  # install, or restore the kept previous model
            self.state.previous = before_current
            self.state.current = new
        self.state.highest_version = release.version
        self._commit()
        ok, why, scorer = self._health_check(release)
        if not ok:
            self.state.current, self.state.previous = before_current, before_previous
            self.state.failed_versions = tuple(sorted({*self.state.failed_versions, release.version}))
            self._commit()
            running = f"v{before_current['version']}" if before_current else "no model"
            log.warning(
                "%s: v%d failed its health check (%s); fell back to %s",
                self.device_id,
                release.version,
                why,
                running,
            )
            return self._event("health_failed", "health", why, release.version)
        assert scorer is not None
        traffic = self._local_traffic(scorer)
        p50, p99 = self._latency(scorer, traffic)
        local = scorer.run(traffic)
        event = {"installed": "installed", "adopt": "adopted", "restore": "restored"}[
            "installed" if decision.action == "install" else decision.action
        ]
        return self._event(
            event,
            decision.code,
            decision.reason,
            release.version,
            latency_p50_ms=p50,
            latency_p99_ms=p99,
            prediction_mean=float(np.mean(local)),
            prediction_counts=histogram(local, release.reference.edges),
        )

    def _health_check(self, release: rules.ModelManifest) -> tuple[bool, str, OnnxScorer | None]:
        data = self.model_bytes()
        assert data is not None and self.state.current is not None
        try:
            scorer = self.scorers.get(self.state.current["sha256"], data)
            feeds = self.scorers.memo(
                ("golden", release.target.sha256, str(release.version)),
                lambda: scorer.feeds(golden_frame(release.golden)),
            )
            p = scorer.run(feeds)
        except (ModelError, DataError) as exc:
            return False, f"model does not load or run: {exc}", None
        except Exception as exc:
            return False, f"model failed on the golden inputs: {type(exc).__name__}: {exc}", None
        expected = np.asarray(release.golden.expected, dtype=np.float64)
        if p.shape != expected.shape:
            return False, f"{p.shape[0]} outputs for {expected.shape[0]} golden inputs", scorer
        if not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
            return (
                False,
                f"{int(np.sum(~np.isfinite(p)))} non-finite or out-of-range probabilities on golden inputs",
                scorer,
            )
        worst = float(np.max(np.abs(p - expected)))
        if worst > release.golden.tolerance:
            return (
                False,
                f"golden outputs differ from the publisher's by {worst:.2e} > {release.golden.tolerance:.0e}",
                scorer,
            )
        return True, "", scorer

    def _latency(self, scorer: OnnxScorer, traffic: dict[str, np.ndarray]) -> tuple[float, float]:
        """Single-row CPU time on this device's traffic (the session runs on the caller's thread)."""
        n = len(next(iter(traffic.values())))
        feeds = [{k: v[i % n : i % n + 1] for k, v in traffic.items()} for i in range(self.latency_calls)]
        scorer.run(feeds[0])
        times = []
        for f in feeds:
            t0 = time.thread_time()
            scorer.run(f)
            times.append((time.thread_time() - t0) * 1e3)
        return float(np.percentile(times, 50)), float(np.percentile(times, 99))

    def _local_traffic(self, scorer: OnnxScorer) -> dict[str, np.ndarray]:
        """This device's own slice of traffic (stable per device), as model inputs."""
        whole = self.scorers.memo(("traffic", str(id(self.traffic))), lambda: scorer.feeds(self.traffic))
        n = len(self.traffic)
        start = int(rules.sha256_hex(self.device_id.encode())[:8], 16) % max(1, n)
        idx = (np.arange(self.traffic_rows) + start) % n
        return {k: v[idx] for k, v in whole.items()}


def _claimed_version(data: bytes) -> int | None:
    """The version an unverified release claims (for the log line only; never trusted)."""
    try:
        signed, _ = rules.open_envelope(data)
    except MetadataInvalid:
        return None
    v = signed.get("version")
    return v if isinstance(v, int) and 0 <= v <= rules.MAX_INT else None


class Fleet:
    """The simulated devices of one fleet, provisioned and polled together."""

    def __init__(
        self,
        folder: Path,
        schema: DatasetSchema,
        traffic: pd.DataFrame,
        traffic_rows: int = 64,
        durable: bool = True,
    ):
        self.folder = folder
        self.scorers = ScorerCache(schema)
        self.traffic = traffic
        self.traffic_rows = traffic_rows
        self.durable = durable

    @property
    def _devices_dir(self) -> Path:
        return self.folder / "devices"

    def device_ids(self) -> list[str]:
        """Ids of the provisioned devices, sorted."""
        if not self._devices_dir.is_dir():
            return []
        return sorted(p.name for p in self._devices_dir.iterdir() if (p / "state.json").is_file())

    def device(self, device_id: str) -> SimulatedDevice:
        """The device with this id, as its folder holds it now."""
        return SimulatedDevice(
            self._devices_dir / device_id, self.scorers, self.traffic, self.traffic_rows, durable=self.durable
        )

    def devices(self) -> list[SimulatedDevice]:
        """Every provisioned device, in id order."""
        return [self.device(d) for d in self.device_ids()]

    def provision(
        self,
        count: int,
        model: str,
        device_class: str,
        runtime_version: str,
        root: bytes,
        factory_model: bytes | None = None,
        factory_version: int = 0,
    ) -> list[str]:
        """Grow the fleet to ``count`` devices (new ones get the factory model and pinned root)."""
        rules.self_signed_root(root)  # trust on first use: the factory image's keys
        have = set(self.device_ids())
        new = []
        for i in range(count):
            device_id = f"dev-{i:05d}"
            if device_id in have:
                continue
            state = DeviceState(device_id, device_class, runtime_version, model, root.decode())
            SimulatedDevice.provision(
                self._devices_dir / device_id,
                state,
                self.scorers,
                self.traffic,
                factory_model,
                factory_version,
                self.durable,
            )
            new.append(device_id)
        return new

    def poll(
        self, server: UpdateServer, now: datetime, device_ids: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """One update cycle on every device (or those named); every unacknowledged telemetry event."""
        events = []
        for device_id in device_ids if device_ids is not None else self.device_ids():
            device = self.device(device_id)
            device.poll(server, now)
            events.extend(device.outbox())
        return events

    def ack(self, events: Sequence[dict[str, Any]]) -> None:
        """Clear the outboxes of the devices whose events were stored."""
        for device_id in sorted({e["device_id"] for e in events}):
            self.device(device_id).ack()

    def versions(self) -> dict[str, int]:
        """How many devices serve each version ('none' for no model)."""
        out: dict[str, int] = {}
        for d in self.devices():
            key = f"v{d.state.current['version']}" if d.state.current else "none"
            out[key] = out.get(key, 0) + 1
        return dict(sorted(out.items()))
