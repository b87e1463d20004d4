"""Where the stream's per-entity window state lives: an embedded checkpoint file, or Redis.

The window logic is ``mlops.features.StreamFeatures`` (pure); a store only keeps it across
restarts and lets other processes read it for online lookups. A checkpoint records, with
the state, the input ``positions`` it covers (e.g. broker offsets), so a restarted consumer
knows exactly which events the state already holds.

* ``EmbeddedFeatureStore``: one Arrow IPC file, written crash-safe (temporary file, fsync,
  rename, fsync of the folder): a reader or a restart sees the previous checkpoint or the
  new one, never a torn file.
* ``RedisFeatureStore``: one Redis key per entity plus a meta key, written in one MULTI/EXEC
  transaction per checkpoint (only the entities that changed), so online lookups from any
  process read a consistent checkpoint. Redis errors become ``FeatureStoreError``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.ipc as ipc

from mlops.errors import PlatformError
from mlops.features import FeatureSet, StreamFeatures

STATE_FILE = "window-state.arrow"


class FeatureStoreError(PlatformError):
    """The feature state store cannot be read or written (missing, corrupt, or its server is down)."""

    exit_code = 7


class FeatureStore(Protocol):
    """Keeps a ``StreamFeatures`` state across restarts and answers online lookups from it."""

    def load(self) -> tuple[StreamFeatures, dict[str, int]]:
        """The last checkpointed state and the input positions it covers (fresh and ``{}`` if none)."""
        ...

    def save(self, state: StreamFeatures, positions: Mapping[str, int]) -> None:
        """Checkpoint ``state`` as covering ``positions``, atomically."""
        ...

    def lookup(self, entity: str, ts_ns: int, view: FeatureSet | None = None) -> dict[str, float]:
        """The features of ``entity`` at ``ts_ns`` (of ``view``) according to the last checkpoint."""
        ...


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EmbeddedFeatureStore:
    """The state in one Arrow IPC file under ``folder`` (in-process state, file checkpoints)."""

    def __init__(self, folder: Path, fs: FeatureSet, extra_views: Sequence[FeatureSet] = ()):
        self.folder = Path(folder)
        self.fs = fs
        self.extra_views = tuple(extra_views)
        self._cache: tuple[tuple[int, int], StreamFeatures] | None = None

    @property
    def path(self) -> Path:
        """The checkpoint file."""
        return self.folder / STATE_FILE

    def load(self) -> tuple[StreamFeatures, dict[str, int]]:
        """The last checkpoint, or a fresh state and ``{}`` when there is none yet."""
        try:
            with pa.memory_map(str(self.path)) as source:
                table = ipc.open_file(source).read_all()
        except FileNotFoundError:
            return StreamFeatures(self.fs, self.extra_views), {}
        except (OSError, pa.ArrowInvalid) as exc:
            raise FeatureStoreError(f"{self.path}: unreadable window state ({exc})") from None
        meta = table.schema.metadata or {}
        positions = json.loads(meta.get(b"positions", b"{}"))
        state = StreamFeatures.from_table(self.fs, table, self.extra_views)
        return state, {k: int(v) for k, v in positions.items()}

    def save(self, state: StreamFeatures, positions: Mapping[str, int]) -> None:
        """Write the checkpoint to a temporary file, fsync it, rename it over the last one, fsync the folder."""
        table = state.to_table()
        meta = dict(table.schema.metadata or {})
        meta[b"positions"] = json.dumps({k: int(v) for k, v in positions.items()}, sort_keys=True).encode()
        table = table.replace_schema_metadata(meta)
        state.take_changed()  # the whole state is in this checkpoint
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{STATE_FILE}.{os.getpid()}.tmp"
        try:
            with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            _fsync_dir(self.folder)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise FeatureStoreError(f"{self.path}: cannot write window state ({exc.strerror})") from None

    def lookup(self, entity: str, ts_ns: int, view: FeatureSet | None = None) -> dict[str, float]:
        """Answer from the last checkpoint (re-read only when the file changed), for ``view``
        (one of the views served; default the first)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return StreamFeatures(self.fs, self.extra_views).lookup(entity, ts_ns, view)
        stamp = (st.st_ino, st.st_mtime_ns)
        if self._cache is None or self._cache[0] != stamp:
            self._cache = (stamp, self.load()[0])
        return self._cache[1].lookup(entity, ts_ns, view)


class RedisFeatureStore:
    """The state in Redis: ``<prefix>:e:<entity>`` per entity (JSON window), ``<prefix>:meta`` for the rest.

    ``client`` is a ``redis.Redis`` (or anything with its ``get``/``mget``/``scan_iter``/``pipeline``).
    """

    def __init__(
        self,
        client: Any,
        fs: FeatureSet,
        prefix: str = "mlops:features",
        extra_views: Sequence[FeatureSet] = (),
    ):
        self.client = client
        self.fs = fs
        self.prefix = prefix
        self.extra_views = tuple(extra_views)

    @classmethod
    def from_url(
        cls, url: str, fs: FeatureSet, prefix: str = "mlops:features", extra_views: Sequence[FeatureSet] = ()
    ) -> RedisFeatureStore:
        """A store on the Redis server at ``url`` (``redis://host:port/db``)."""
        import redis

        return cls(redis.Redis.from_url(url, socket_timeout=5.0), fs, prefix, extra_views)

    def _entity_key(self, entity: str) -> str:
        return f"{self.prefix}:e:{entity}"

    @property
    def _meta_key(self) -> str:
        return f"{self.prefix}:meta"

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        import redis

        try:
            return fn(*args)
        except redis.RedisError as exc:
            raise FeatureStoreError(f"redis: cannot {what} ({exc.__class__.__name__}: {exc})") from None

    def _meta(self) -> dict[str, Any] | None:
        raw = self._call("read the state", self.client.get, self._meta_key)
        return None if raw is None else json.loads(raw)

    def load(self) -> tuple[StreamFeatures, dict[str, int]]:
        """Every entity window and the counters of the last checkpoint (fresh and ``{}`` if none)."""
        state = StreamFeatures(self.fs, self.extra_views)
        meta = self._meta()
        if meta is None:
            return state, {}
        state.restore_counters(meta["counters"])
        keys = list(self._call("list entities", self.client.scan_iter, f"{self.prefix}:e:*", 1000))
        start = len(self.prefix) + 3
        for i in range(0, len(keys), 1000):
            chunk = keys[i : i + 1000]
            for key, raw in zip(chunk, self._call("read the state", self.client.mget, chunk), strict=True):
                if raw is not None:
                    name = key.decode() if isinstance(key, bytes) else key
                    state.set_entity_window(name[start:], json.loads(raw))
        state.take_changed()
        return state, {k: int(v) for k, v in meta["positions"].items()}

    def save(self, state: StreamFeatures, positions: Mapping[str, int]) -> None:
        """Write the entities that changed since the last save, and the meta key, in one transaction."""
        state.prune()
        changed = state.take_changed()
        pipe = self.client.pipeline(transaction=True)
        for entity in changed:
            window = state.entity_window(entity)
            if window is None:
                pipe.delete(self._entity_key(entity))
            else:
                pipe.set(self._entity_key(entity), json.dumps(window))
        meta = {"counters": state.counters(), "positions": {k: int(v) for k, v in positions.items()}}
        pipe.set(self._meta_key, json.dumps(meta))
        try:
            self._call("write the state", pipe.execute)
        except FeatureStoreError:
            state.mark_changed(changed)  # not saved: they stay pending for the next checkpoint
            raise

    def lookup(self, entity: str, ts_ns: int, view: FeatureSet | None = None) -> dict[str, float]:
        """Read one entity's window and the counters, and answer with the shared window logic."""
        meta_raw, window_raw = self._call(
            "read the state", self.client.mget, [self._meta_key, self._entity_key(str(entity))]
        )
        state = StreamFeatures(self.fs, self.extra_views)
        if meta_raw is not None:
            state.restore_counters(json.loads(meta_raw)["counters"])
        if window_raw is not None:
            state.set_entity_window(str(entity), json.loads(window_raw))
        return state.lookup(entity, ts_ns, view)
