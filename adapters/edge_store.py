"""Edge state on disk and in DuckDB: signing keys, exported variants, the release repository, telemetry.

Layout under ``$MLOPS_HOME/edge``::

    keys/online/<keyid>.pem          the release key: signs releases and timestamps (PKCS8 PEM,
                                     mode 0600, folder 0700); publishing reads only this one
    keys/offline/<keyid>.pem         the root key: signs root metadata only (init, rotate). Move
                                     it off the machine and point ``edge.root_key_dir`` at it
                                     when a rotation needs it
    keys/root/<n>.root.json          signed root metadata, every version (devices walk the chain)
    variants/<model>/v<N>/<budget>/  one export: report.json/.md, variants.png, sample.parquet,
                                     and the ONNX file of each variant that passed its gate
    variants/<model>/latest.json     which export ``publish`` takes by default
    repo/<model>/releases/<v>/       model.onnx + release.json (the release as first signed)
    repo/<model>/targets.json        the signed release metadata devices poll (current cohort)
    repo/<model>/timestamp.json      short-lived signed statement of which targets.json is current
    repo/<model>/snapshots/<sha256>.json  the served release metadata by hash (what devices fetch)
    repo/<model>/state.json          last good (fully rolled-out) release
    rollouts/<rollout_id>.json       rollout status
    fleets/<fleet>/devices/<id>/     simulated devices (adapters.edge_fleet)
    telemetry.duckdb                 device events; its own file, written copy-on-write

Every file is written to a temporary name in its folder, fsynced and renamed, and the folder
is fsynced after the rename, so a reader sees the old file or the new one, never half of
one, and after a power cut the rename is there too. DuckDB connections are short-lived,
serialised per process, and wait for each other's file lock across processes.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import duckdb
import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from adapters.files import atomic_write
from adapters.warehouse import StorageError, Warehouse, WarehouseBusy
from mlops.edge.errors import EdgeError, KeyStoreError, NothingToPublish
from mlops.edge.manifest import (
    ModelManifest,
    RootMeta,
    iso,
    key_id,
    open_envelope,
    parse_manifest,
    parse_root,
    public_bytes,
    sha256_hex,
    sign,
)
from mlops.errors import DataError
from mlops.settings import Settings

# --------------------------------------------------------------------------- files


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), mode=0o644)


def read_json(path: Path) -> Any:
    """The JSON at ``path``; None if there is no file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise EdgeError(f"{path}: cannot be read ({exc})") from None


@dataclass(frozen=True)
class EdgePaths:
    """Where each part of the edge state lives under ``$MLOPS_HOME/edge`` (layout above)."""

    root: Path

    @property
    def keys(self) -> Path:
        """Signing keys and every version of the signed root metadata."""
        return self.root / "keys"

    @property
    def variants(self) -> Path:
        """Exported variants, by model, version and budget."""
        return self.root / "variants"

    @property
    def repo(self) -> Path:
        """The release repository devices poll."""
        return self.root / "repo"

    @property
    def rollouts(self) -> Path:
        """One status file per OTA rollout."""
        return self.root / "rollouts"

    @property
    def fleets(self) -> Path:
        """Simulated fleets and their devices."""
        return self.root / "fleets"

    @property
    def telemetry(self) -> Path:
        """The DuckDB file of device events."""
        return self.root / "telemetry.duckdb"


def edge_paths(settings: Settings) -> EdgePaths:
    """The edge folders under these settings' home."""
    return EdgePaths(settings.edge_dir)


def key_store(settings: Settings) -> KeyStore:
    """The key store of ``settings`` (root key in ``edge.root_key_dir`` if set)."""
    offline = Path(settings.edge.root_key_dir) if settings.edge.root_key_dir else None
    return KeyStore(edge_paths(settings).keys, timedelta(days=settings.edge.root_ttl_days), offline)


# --------------------------------------------------------------------------- keys


class KeyStore:
    """Ed25519 keys in two roles and the signed root chain that tells devices which keys to trust.

    The *root* key signs root metadata only: it is needed by ``init`` and ``rotate`` and
    by nothing that runs routinely, so it can be kept offline (``offline`` folder). The
    *release* key is online: it signs releases, cohort changes and timestamps. A stolen
    release key can sign releases until it is rotated out; it cannot sign a root, so it
    cannot make devices trust another key.
    """

    def __init__(self, folder: Path, root_ttl: timedelta, offline: Path | None = None):
        self.folder = folder
        self.root_ttl = root_ttl
        self.offline = offline if offline is not None else folder / "offline"

    @property
    def online(self) -> Path:
        """Folder of the release (online) private keys."""
        return self.folder / "online"

    @property
    def _roots(self) -> Path:
        return self.folder / "root"

    def root_versions(self) -> list[int]:
        """Versions of the root metadata stored, ascending."""
        if not self._roots.is_dir():
            return []
        return sorted(int(p.name.split(".")[0]) for p in self._roots.glob("*.root.json"))

    def root_bytes(self, version: int) -> bytes:
        """The signed root metadata of ``version``."""
        try:
            return (self._roots / f"{version}.root.json").read_bytes()
        except FileNotFoundError:
            raise KeyStoreError(f"no root metadata version {version} in {self._roots}") from None

    def root(self) -> RootMeta:
        """The newest root metadata."""
        versions = self.root_versions()
        if not versions:
            raise KeyStoreError(
                f"no signing keys in {self.folder} (run `mlops edge keys init`, or publish once)"
            )
        return parse_root(self.root_bytes(versions[-1]))[0]

    @staticmethod
    def _load(folder: Path, kid: str, role: str) -> Ed25519PrivateKey:
        path = folder / f"{kid}.pem"
        try:
            key = load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise KeyStoreError(
                f"{role} key {kid[:16]}... is not in {folder} (rotated out, kept offline, or never here)"
            ) from None
        except (ValueError, TypeError) as exc:
            raise KeyStoreError(f"{path}: not a readable private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyStoreError(f"{path}: not an Ed25519 key")
        return key

    @staticmethod
    def _new_key(folder: Path) -> Ed25519PrivateKey:
        key = Ed25519PrivateKey.generate()
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        atomic_write(folder / f"{key_id(key.public_key())}.pem", pem, mode=0o600)
        return key

    def _write_root(
        self,
        version: int,
        root_keys: Sequence[Ed25519PrivateKey],
        release_keys: Sequence[Ed25519PrivateKey],
        signers: Sequence[Ed25519PrivateKey],
    ) -> RootMeta:
        pub = {
            key_id(k.public_key()): public_bytes(k.public_key()).hex() for k in [*root_keys, *release_keys]
        }
        signed = {
            "kind": "root",
            "spec_version": "1.0",
            "version": version,
            "expires": iso(datetime.now(UTC) + self.root_ttl),
            "keys": pub,
            "roles": {
                "root": {"keyids": [key_id(k.public_key()) for k in root_keys], "threshold": 1},
                "release": {"keyids": [key_id(k.public_key()) for k in release_keys], "threshold": 1},
            },
        }
        atomic_write(self._roots / f"{version}.root.json", sign(signed, signers), mode=0o644)
        return self.root()

    def init(self) -> RootMeta:
        """Create a root key, a release key and root v1 (signed by the root key); an existing store is kept."""
        if self.root_versions():
            return self.root()
        root_key = self._new_key(self.offline)
        release_key = self._new_key(self.online)
        return self._write_root(1, [root_key], [release_key], [root_key])

    def root_keys(self) -> list[Ed25519PrivateKey]:
        """The root role's private keys, from the offline folder (``KeyStoreError`` if not mounted)."""
        return [self._load(self.offline, kid, "root") for kid in self.root().keyids("root")]

    def rotate(self, *, root: bool = False) -> tuple[RootMeta, RootMeta]:
        """A new release key (and with ``root``, a new root key too) in root ``n+1``.

        Root ``n+1`` is signed by the current root key and, if it changes, by the new one.
        The retired private keys are deleted: what they sign is refused by every device that
        has seen the new root. Re-sign what is served afterwards (``tasks.edge.rotate_keys``).
        """
        old_root = self.root()
        old_root_keys = self.root_keys()
        new_release = self._new_key(self.online)
        new_root_keys = [self._new_key(self.offline)] if root else old_root_keys
        signers = [*old_root_keys, *(new_root_keys if root else [])]
        new = self._write_root(old_root.version + 1, new_root_keys, [new_release], signers)
        for kid in old_root.keyids("release"):
            (self.online / f"{kid}.pem").unlink(missing_ok=True)
        if root:
            for kid in old_root.keyids("root"):
                (self.offline / f"{kid}.pem").unlink(missing_ok=True)
        return old_root, new

    def signing_keys(self) -> list[Ed25519PrivateKey]:
        """The release role's private keys (online)."""
        return [self._load(self.online, kid, "release") for kid in self.root().keyids("release")]

    def sign(self, signed: Mapping[str, Any]) -> bytes:
        """The envelope of ``signed``, signed by the release key(s)."""
        return sign(signed, self.signing_keys())


# --------------------------------------------------------------------------- exported variants


class VariantStore:
    """Exports: reports for every variant, model files only for those that passed."""

    def __init__(self, folder: Path):
        self.folder = folder

    def export_dir(self, model: str, version: int, budget: str) -> Path:
        """The folder of one export: ``<model>/v<version>/<budget>``."""
        return self.folder / model / f"v{version}" / budget

    def write_export(
        self, model: str, version: int, budget: str, files: Mapping[str, bytes], report: Mapping[str, Any]
    ) -> Path:
        """Write one export's files and report, then point ``latest.json`` at it."""
        out = self.export_dir(model, version, budget)
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*.onnx"):  # a re-export replaces the previous one's models
            if old.name not in files:
                old.unlink()
        for name, data in files.items():
            atomic_write(out / name, data, mode=0o644)
        write_json(out / "report.json", dict(report))
        write_json(
            self.folder / model / "latest.json", {"path": str(out), "version": version, "budget": budget}
        )
        return out

    def latest(self, model: str) -> tuple[Path, dict[str, Any]]:
        """The folder and report of the export ``latest.json`` names; ``NothingToPublish`` if none."""
        pointer = read_json(self.folder / model / "latest.json")
        if pointer is None:
            raise NothingToPublish(f"no edge export of '{model}' yet (run `mlops edge export`)")
        out = Path(pointer["path"])
        report = read_json(out / "report.json")
        if report is None:
            raise NothingToPublish(f"{out}: the export's report.json is missing")
        return out, report


# --------------------------------------------------------------------------- releases

KEEP_SNAPSHOTS = 8
"""Release metadata snapshots kept per model (devices fetch the one the timestamp names)."""
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ReleaseRepository:
    """What the update server serves: releases (model + signed metadata) and the current targets."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _model_dir(self, model: str) -> Path:
        return self.folder / model

    def versions(self, model: str) -> list[int]:
        """The release versions stored for ``model``, ascending."""
        rel = self._model_dir(model) / "releases"
        if not rel.is_dir():
            return []
        return sorted(int(p.name) for p in rel.iterdir() if p.name.isdigit())

    def latest_version(self, model: str) -> int:
        """The newest release version of ``model``; 0 before its first release."""
        versions = self.versions(model)
        return versions[-1] if versions else 0

    def add(self, model: str, version: int, model_bytes: bytes, metadata: bytes) -> None:
        """Store a new release (not yet served: ``serve`` it with a timestamp). Versions only go up."""
        if version <= self.latest_version(model):
            raise EdgeError(
                f"release v{version} of '{model}' is not newer than v{self.latest_version(model)}"
            )
        out = self._model_dir(model) / "releases" / str(version)
        atomic_write(out / "model.onnx", model_bytes, mode=0o644)
        atomic_write(out / "release.json", metadata, mode=0o644)

    def serve(self, model: str, metadata: bytes, timestamp: bytes) -> None:
        """Replace the metadata devices poll (e.g. the same release with a wider cohort) and its timestamp.

        Consistent snapshots: the release metadata is first stored under its sha256, which
        is how devices fetch it (the hash the timestamp names), then ``targets.json`` and
        last ``timestamp.json`` are replaced. A device polling in between gets the old
        timestamp and the metadata it names, or the new pair, never a mismatch. The last
        ``KEEP_SNAPSHOTS`` snapshots are kept for devices that read the previous timestamp.
        """
        snapshots = self._model_dir(model) / "snapshots"
        atomic_write(snapshots / f"{sha256_hex(metadata)}.json", metadata, mode=0o644)
        atomic_write(self._model_dir(model) / "targets.json", metadata, mode=0o644)
        atomic_write(self._model_dir(model) / "timestamp.json", timestamp, mode=0o644)
        old = sorted(snapshots.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)[:-KEEP_SNAPSHOTS]
        for path in old:
            path.unlink(missing_ok=True)

    def served(self, model: str, sha256: str | None = None) -> bytes | None:
        """The release metadata devices poll now, or the snapshot with that ``sha256``; None if absent."""
        if sha256 is not None and not _HEX64.fullmatch(sha256):
            return None
        path = (
            self._model_dir(model) / "targets.json"
            if sha256 is None
            else self._model_dir(model) / "snapshots" / f"{sha256}.json"
        )
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def timestamp(self, model: str) -> bytes | None:
        """The timestamp devices poll now, if any."""
        try:
            return (self._model_dir(model) / "timestamp.json").read_bytes()
        except FileNotFoundError:
            return None

    def timestamp_version(self, model: str) -> int:
        """The version of the timestamp served now (0 for none): the next one is one higher."""
        data = self.timestamp(model)
        if data is None:
            return 0
        signed, _ = open_envelope(data)
        version = signed.get("version")
        return version if isinstance(version, int) else 0

    def release_metadata(self, model: str, version: int) -> bytes:
        """A release's signed metadata as the publisher first stored it; ``NothingToPublish`` if none."""
        try:
            return (self._model_dir(model) / "releases" / str(version) / "release.json").read_bytes()
        except FileNotFoundError:
            raise NothingToPublish(f"'{model}' has no release v{version}") from None

    def release(self, model: str, version: int) -> ModelManifest:
        """A release's metadata as the repository stored it (the publisher's own record)."""
        signed, _ = open_envelope(self.release_metadata(model, version))
        return parse_manifest(signed)

    def model_bytes(self, model: str, version: int) -> bytes:
        """A release's model file."""
        try:
            return (self._model_dir(model) / "releases" / str(version) / "model.onnx").read_bytes()
        except FileNotFoundError:
            raise NothingToPublish(f"'{model}' has no release v{version}") from None

    def open_model(self, model: str, version: int) -> BinaryIO:
        """A release's model file opened for streaming (the caller closes it)."""
        try:
            return (self._model_dir(model) / "releases" / str(version) / "model.onnx").open("rb")
        except FileNotFoundError:
            raise NothingToPublish(f"'{model}' has no release v{version}") from None

    def state(self, model: str) -> dict[str, Any]:
        """The model's release state (e.g. ``last_good``); empty before anything was recorded."""
        return read_json(self._model_dir(model) / "state.json") or {}

    def set_state(self, model: str, **values: Any) -> None:
        """Set fields of the model's release state, keeping the others, atomically."""
        write_json(self._model_dir(model) / "state.json", self.state(model) | values)

    def models(self) -> list[str]:
        """The models with a folder in the repository, sorted."""
        return sorted(p.name for p in self.folder.iterdir() if p.is_dir()) if self.folder.is_dir() else []


# --------------------------------------------------------------------------- telemetry

_DDL = """
CREATE TABLE IF NOT EXISTS device_events (
    ts TIMESTAMP NOT NULL,
    fleet VARCHAR NOT NULL,
    rollout_id VARCHAR,
    device_id VARCHAR NOT NULL,
    model VARCHAR NOT NULL,
    event VARCHAR NOT NULL,
    code VARCHAR,
    reason VARCHAR,
    release_version INTEGER,
    running_version INTEGER,
    running_sha256 VARCHAR,
    latency_p50_ms DOUBLE,
    latency_p99_ms DOUBLE,
    prediction_mean DOUBLE,
    prediction_counts INTEGER[]
);
CREATE TABLE IF NOT EXISTS rollouts (
    rollout_id VARCHAR PRIMARY KEY,
    fleet VARCHAR NOT NULL,
    model VARCHAR NOT NULL,
    version INTEGER NOT NULL,
    phase VARCHAR NOT NULL,
    percent DOUBLE NOT NULL,
    updated_at TIMESTAMP NOT NULL,
    status VARCHAR NOT NULL
);
"""

EVENT_COLUMNS = (
    "ts",
    "fleet",
    "rollout_id",
    "device_id",
    "model",
    "event",
    "code",
    "reason",
    "release_version",
    "running_version",
    "running_sha256",
    "latency_p50_ms",
    "latency_p99_ms",
    "prediction_mean",
    "prediction_counts",
)

_ARROW_TYPES = {
    "fleet": pa.string(),
    "rollout_id": pa.string(),
    "device_id": pa.string(),
    "model": pa.string(),
    "event": pa.string(),
    "code": pa.string(),
    "reason": pa.string(),
    "release_version": pa.int32(),
    "running_version": pa.int32(),
    "running_sha256": pa.string(),
    "latency_p50_ms": pa.float64(),
    "latency_p99_ms": pa.float64(),
    "prediction_mean": pa.float64(),
    "prediction_counts": pa.list_(pa.int32()),
}

_LOCK = threading.Lock()


class TelemetryStore:
    """Device telemetry and rollout status in a DuckDB file of their own, written copy-on-write.

    Several processes use the file (the rollout flow writes, ``mlops edge status`` reads). A
    write changes a private copy and renames it over the file (``adapters.warehouse``), so a
    kill at any moment leaves the last published file whole; reads attach that file read-only.
    Both wait up to ``lock_timeout`` seconds for the other side's lock, then fail in one line.
    """

    def __init__(self, path: Path, *, lock_timeout: float = 30.0):
        self.path = path
        self.lock_timeout = lock_timeout
        self._file = Warehouse.at(path.parent, path.name)

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        try:
            yield
        except WarehouseBusy:
            raise EdgeError(
                f"telemetry store {self.path} stayed locked by another process for {self.lock_timeout:.0f}s"
            ) from None
        except (StorageError, DataError) as exc:
            raise EdgeError(f"telemetry store {self.path} cannot be used: {exc}") from None

    @contextmanager
    def _writing(self) -> Iterator[duckdb.DuckDBPyConnection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _LOCK, self._guarded(), self._file.writer(self.lock_timeout, ddl=(_DDL,)) as work:
            yield work.con

    @contextmanager
    def _reading(self) -> Iterator[duckdb.DuckDBPyConnection]:
        if not self.path.exists():  # the first use creates the file and its tables
            with self._writing():
                pass
        with _LOCK, self._guarded(), self._file.reader(self.lock_timeout) as con:
            yield con

    def append(self, events: Iterable[Mapping[str, Any]]) -> int:
        """Insert events in one statement (an Arrow batch; row-by-row inserts cost seconds per thousand)."""
        rows = list(events)
        if not rows:
            return 0
        batch = pa.table(
            {
                "ts": pa.array([str(e["ts"]) for e in rows], pa.string()),
                **{c: pa.array([e.get(c) for e in rows], _ARROW_TYPES[c]) for c in EVENT_COLUMNS[1:]},
            }
        )
        cols = ", ".join(EVENT_COLUMNS)
        select = ", ".join("CAST(ts AS TIMESTAMP)" if c == "ts" else c for c in EVENT_COLUMNS)
        with self._writing() as con:
            con.register("batch", batch)
            con.execute(f"INSERT INTO device_events ({cols}) SELECT {select} FROM batch")
            con.unregister("batch")
        return len(rows)

    def events(
        self, rollout_id: str | None = None, device_id: str | None = None, fleet: str | None = None
    ) -> list[dict[str, Any]]:
        """Device events in time order, only those of the given rollout, device and fleet."""
        where, params = [], []
        for col, value in (("rollout_id", rollout_id), ("device_id", device_id), ("fleet", fleet)):
            if value is not None:
                where.append(f"{col} = ?")
                params.append(value)
        sql = f"SELECT {', '.join(EVENT_COLUMNS)} FROM device_events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._reading() as con:
            rows = con.execute(sql + " ORDER BY ts, device_id", params).fetchall()
        return [dict(zip(EVENT_COLUMNS, r, strict=True)) for r in rows]

    def save_rollout(self, fleet: str, status: Mapping[str, Any]) -> None:
        """Record a rollout's latest status (phase, stage percent and the whole status as JSON)."""
        with self._writing() as con:
            con.execute(
                "INSERT OR REPLACE INTO rollouts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    status["rollout_id"],
                    fleet,
                    status["model"],
                    status["version"],
                    status["phase"],
                    status["stages"][status["stage"]],
                    datetime.now(UTC).replace(tzinfo=None),
                    json.dumps(status),
                ],
            )

    def rollouts(self, limit: int = 20) -> list[dict[str, Any]]:
        """The ``limit`` most recently updated rollouts, newest first."""
        with self._reading() as con:
            rows = con.execute(
                "SELECT rollout_id, fleet, model, version, phase, percent, updated_at FROM rollouts ORDER BY updated_at DESC LIMIT ?",
                [limit],
            ).fetchall()
        cols = ("rollout_id", "fleet", "model", "version", "phase", "percent", "updated_at")
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def event_counts(self, rollout_id: str) -> dict[str, int]:
        """How many events of each kind (``event`` or ``event:code``) a rollout's devices reported."""
        with self._reading() as con:
            rows = con.execute(
                "SELECT event || coalesce(':' || code, ''), count(*) FROM device_events WHERE rollout_id = ? GROUP BY 1 ORDER BY 1",
                [rollout_id],
            ).fetchall()
        return {k: int(v) for k, v in rows}
