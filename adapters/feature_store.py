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

Online readers (the serving path, read-only): ``CheckpointIndex`` answers lookups from one
embedded checkpoint file without rebuilding the whole state (an entity's events are turned
into a window on its first lookup), and ``AsyncRedisFeatureReader`` reads many entities'
windows in one ``MGET`` without blocking the event loop. Both answer with the same window
logic as the stream (``StreamFeatures.lookup``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from adapters.files import fsync_dir, fsync_file
from mlops.errors import PlatformError
from mlops.features import FeatureSet, StateMismatch, StreamFeatures, feature_views
from mlops.settings import RedisStateStore, Settings

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
        """The features of ``entity`` at ``ts_ns`` (of ``view``, default the first) according to
        the last checkpoint."""
        ...


class EmbeddedFeatureStore:
    """The state in one Arrow IPC file under ``folder`` (in-process state, file checkpoints)."""

    def __init__(self, folder: Path, fs: FeatureSet, extra_views: Sequence[FeatureSet] = ()):
        self.folder = Path(folder)
        self.fs = fs
        self.extra_views = tuple(extra_views)  # other views the state serves (dual-write window)
        self._cache: tuple[tuple[int, int, int], CheckpointIndex] | None = None

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
            fsync_file(tmp)
            os.replace(tmp, self.path)
            fsync_dir(self.folder)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise FeatureStoreError(f"{self.path}: cannot write window state ({exc.strerror})") from None

    def stamp(self) -> tuple[int, int, int] | None:
        """What identifies the published checkpoint (inode, size, mtime), or None when there is none."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def index(self) -> CheckpointIndex | None:
        """A lookup index over the last checkpoint, or None when there is none yet."""
        try:
            with pa.memory_map(str(self.path)) as source:
                table = ipc.open_file(source).read_all()
        except FileNotFoundError:
            return None
        except (OSError, pa.ArrowInvalid) as exc:
            raise FeatureStoreError(f"{self.path}: unreadable window state ({exc})") from None
        return CheckpointIndex(self.fs, table, self.extra_views)

    def lookup(self, entity: str, ts_ns: int, view: FeatureSet | None = None) -> dict[str, float]:
        """Answer from the last checkpoint (re-read only when the file changed), for ``view``."""
        stamp = self.stamp()
        if stamp is None:
            return StreamFeatures(self.fs, self.extra_views).lookup(entity, ts_ns, view)
        if self._cache is None or self._cache[0] != stamp:
            index = self.index()
            if index is None:
                return StreamFeatures(self.fs, self.extra_views).lookup(entity, ts_ns, view)
            self._cache = (stamp, index)
        return self._cache[1].lookup(entity, ts_ns, view)


class CheckpointIndex:
    """Lookups over one embedded checkpoint table, built in milliseconds (no per-event Python work).

    ``to_table`` writes each entity's events contiguously and in time order; the index keeps
    where each entity's rows start and end, and an entity's window becomes a ``StreamFeatures``
    window on its first lookup. The table is never modified: an index is a read-only snapshot.
    """

    def __init__(self, fs: FeatureSet, table: pa.Table, extra_views: Sequence[FeatureSet] = ()):
        self.fs = fs
        self._state = StreamFeatures.from_table(fs, table.slice(0, 0), extra_views)  # checks digest, columns
        self.max_ts = self._state.max_ts
        spans = _entity_spans(table)
        if spans is None:  # not grouped by entity: group it (a stable sort keeps time order)
            table = table.take(pc.sort_indices(table, [("entity", "ascending")]))
            spans = _entity_spans(table)
        self._spans: dict[str, tuple[int, int]] = spans or {}
        self._ts = table.column("ts_ns").to_numpy()
        self._values = {c: table.column("value:" + c).to_numpy() for c in self._state.source_columns}
        self._ready: set[str] = set()

    @property
    def entities(self) -> int:
        """How many entities the checkpoint holds events of."""
        return len(self._spans)

    def lookup(self, entity: str, ts_ns: int, view: FeatureSet | None = None) -> dict[str, float]:
        """The features of ``entity`` at ``ts_ns`` (of ``view``) from the checkpoint's events strictly before it."""
        key = str(entity)
        if key not in self._ready:
            span = self._spans.get(key)
            if span is not None:  # an unknown entity is never remembered: nothing grows per request
                a, b = span
                window = {
                    "ts_ns": self._ts[a:b].tolist(),
                    "values": {c: v[a:b].tolist() for c, v in self._values.items()},
                }
                self._state.set_entity_window(key, window)
                self._ready.add(key)
        return self._state.lookup(key, ts_ns, view)


def state_store(settings: Settings, fs: FeatureSet, topic: str, group: str) -> FeatureStore:
    """The configured window-state store of one consumer group (``features.store``): the
    checkpoint file under ``MLOPS_HOME/stream/state/<topic>/<group>``, or Redis keys under
    ``<prefix>:<topic>:<group>``; it keeps the history of ``fs`` and of ``features.extra_views``."""
    spec = settings.features.store
    extra = feature_views(settings)[1:]
    if isinstance(spec, RedisStateStore):
        return RedisFeatureStore.from_url(spec.url, fs, f"{spec.prefix}:{topic}:{group}", extra)
    return EmbeddedFeatureStore(settings.home_path / "stream" / "state" / topic / group, fs, extra)


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

    def clear(self) -> int:
        """Delete every key of this store (its prefix); how many were deleted."""
        keys = list(self._call("list entities", self.client.scan_iter, f"{self.prefix}:e:*", 1000))
        keys.append(self._meta_key)
        deleted = 0
        for i in range(0, len(keys), 1000):
            deleted += int(self._call("delete the state", self.client.delete, *keys[i : i + 1000]))
        return deleted

    def lookup(self, entity: str, ts_ns: int, view: FeatureSet | None = None) -> dict[str, float]:
        """Read one entity's window and the counters, and answer with the shared window logic."""
        meta_raw, window_raw = self._call(
            "read the state", self.client.mget, [self._meta_key, self._entity_key(str(entity))]
        )
        return window_answer(
            self.fs, meta_raw, window_raw, str(entity), ts_ns, extra_views=self.extra_views, view=view
        )


def _entity_spans(table: pa.Table) -> dict[str, tuple[int, int]] | None:
    """Each entity's row range when the table's rows are grouped by entity, else None."""
    if not table.num_rows:
        return {}
    encoded = pc.dictionary_encode(table.column("entity").combine_chunks())
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    if len(starts) != len(encoded.dictionary):
        return None
    ends = np.r_[starts[1:], len(codes)]
    return dict(
        zip(encoded.dictionary.to_pylist(), zip(starts.tolist(), ends.tolist(), strict=True), strict=True)
    )


def window_answer(
    fs: FeatureSet,
    meta_raw: bytes | str | None,
    window_raw: bytes | str | None,
    entity: str,
    ts_ns: int,
    *,
    check_meta: bool = True,
    extra_views: Sequence[FeatureSet] = (),
    view: FeatureSet | None = None,
) -> dict[str, float]:
    """The features of ``entity`` at ``ts_ns`` from a Redis checkpoint's raw meta and window values
    (``StateMismatch`` when the checkpoint was built for other feature declarations; with
    ``check_meta=False`` the caller has checked this meta already)."""
    state = StreamFeatures(fs, extra_views)
    if meta_raw is not None and check_meta:
        state.restore_counters(json.loads(meta_raw)["counters"])
    if window_raw is not None:
        state.set_entity_window(entity, json.loads(window_raw))
    return state.lookup(entity, ts_ns, view)


class AsyncRedisFeatureReader:
    """Online lookups in a ``RedisFeatureStore``'s keys from an event loop: read-only, one ``MGET``
    per batch of entities on a pipelined connection (``adapters.redis_reads``), every call
    bounded by ``timeout`` seconds.

    Keys are built from bytes prepared once; the answers come from one ``StreamFeatures``
    made at construction (its ``lookup_events``). The parsed windows of up to
    ``cache_entities`` entities are kept with the meta value and the exact bytes they were
    read with. A checkpoint rewrites the meta key and the changed entities in one
    transaction, so a window read under the current meta is the current window. While
    ``watch`` runs (it reads the meta key every ``every`` seconds), a lookup whose entities
    are all kept under the meta seen within the last ``every`` + ``timeout`` seconds is
    answered from memory: answers lag a new checkpoint by at most that, like the embedded
    store's checkpoint index. Otherwise (or without ``watch``) the lookup reads Redis, and an
    entity whose bytes did not change is not parsed again. Only entities Redis holds are
    kept, so ids that do not exist cannot grow memory (each costs a read).
    """

    def __init__(
        self,
        url: str,
        fs: FeatureSet,
        prefix: str,
        timeout: float,
        extra_views: Sequence[FeatureSet] = (),
        cache_entities: int = 4096,
    ):
        from adapters.redis_reads import PipelinedRedis

        self.fs = fs
        self.extra_views = tuple(extra_views)
        self.prefix = prefix
        self.where = f"{_redacted(url)} {prefix}"
        self._state = StreamFeatures(fs, self.extra_views)
        self._meta_key = f"{prefix}:meta".encode()
        self._entity_prefix = f"{prefix}:e:".encode()
        self._checked_meta: bytes | None = None
        self._meta: bytes | None = None  # the newest meta value seen (by a lookup or by watch)
        self._meta_at = float("-inf")  # loop time it was seen
        self.max_staleness = 0.0  # 0: every lookup reads Redis (set by watch)
        self._windows: dict[str, tuple[bytes, bytes, Any]] = {}  # entity -> (meta, value, window)
        self.cache_entities = cache_entities
        self.reads = 0  # lookups that read Redis
        self.client = PipelinedRedis(url, timeout)

    async def watch(self, every: float) -> None:
        """Read the meta key every ``every`` seconds until cancelled; while this runs, repeat
        entities under an unchanged checkpoint are answered from memory (see the class doc)."""
        import asyncio
        import logging

        from adapters.redis_reads import RespError

        loop = asyncio.get_running_loop()
        self.max_staleness = every + self.client.timeout
        try:
            while True:
                try:
                    (meta,) = await self.client.mget([self._meta_key])
                except (RespError, TimeoutError) as exc:  # lookups read Redis until it answers again
                    logging.getLogger(__name__).warning("online features: redis meta check failed (%s)", exc)
                else:
                    if meta != self._meta:
                        self._meta = meta
                    self._meta_at = loop.time()
                await asyncio.sleep(every)
        finally:
            self.max_staleness = 0.0

    async def lookup_many(
        self, keys: Sequence[tuple[str, int]], views: Sequence[FeatureSet] = ()
    ) -> list[dict[str, float]]:
        """The features of each (entity, time), of every view in ``views`` (default: the first
        view) from one read; ``FeatureStoreError`` when Redis does not answer or holds no
        checkpoint under the prefix, ``StateMismatch`` when it was built for other
        declarations or an entity's value is malformed."""
        import asyncio

        from adapters.redis_reads import RespError

        state, cache = self._state, self._windows
        meta = self._meta
        now = asyncio.get_running_loop().time()
        if self.max_staleness and meta is not None and now - self._meta_at <= self.max_staleness:
            out = []
            for entity, ts in keys:
                hit = cache.get(entity)
                if hit is None or hit[0] is not meta:
                    break
                out.append(views_answer(state, hit[2], ts, views))
            else:
                return out
        ep = self._entity_prefix
        names = [self._meta_key, *(ep + e.encode() for e, _ in keys)]
        self.reads += 1
        try:
            raw = await self.client.mget(names)
        except TimeoutError:
            raise FeatureStoreError(
                f"redis: no answer within {self.client.timeout:g} s (serving.online_features.timeout_seconds)"
            ) from None
        except RespError as exc:
            raise FeatureStoreError(f"redis: cannot read the window state ({exc})") from None
        meta = raw[0]
        if meta is None:
            raise FeatureStoreError(f"redis: no window state checkpoint under {self.prefix!r} yet")
        if meta != self._checked_meta:  # a new checkpoint: check its declaration digest once
            try:
                counters = json.loads(meta)["counters"]
            except (ValueError, KeyError, TypeError):
                raise StateMismatch(f"window state under {self.prefix!r}: malformed meta key") from None
            StreamFeatures(self.fs, self.extra_views).restore_counters(counters)
            self._checked_meta = meta
        if meta != self._meta:
            self._meta = meta
        else:
            meta = self._meta  # the same object, for the identity check above
        self._meta_at = asyncio.get_running_loop().time()
        out = []
        for (entity, ts), value in zip(keys, raw[1:], strict=True):
            win = None
            if value is not None:
                hit = cache.get(entity)
                if hit is not None and hit[1] == value:
                    win = hit[2]
                    cache[entity] = (meta, value, win)
                else:
                    win = self._parse(entity, value, meta)
            out.append(views_answer(state, win, ts, views))
        return out

    def _parse(self, entity: str, value: bytes, meta: bytes) -> Any:
        try:
            window = json.loads(value)
        except ValueError:
            raise StateMismatch(f"window state of {entity}: not JSON") from None
        if not isinstance(window, dict):
            raise StateMismatch(f"window state of {entity}: not an object")
        win = self._state.window_of(entity, window)
        cache = self._windows
        if entity not in cache and len(cache) >= self.cache_entities:
            del cache[next(iter(cache))]  # the entity read longest ago first
        cache[entity] = (meta, value, win)
        return win

    async def close(self) -> None:
        """Close the connection."""
        await self.client.close()


def views_answer(
    state: StreamFeatures, win: Any, ts_ns: int, views: Sequence[FeatureSet] = ()
) -> dict[str, float]:
    """The features at ``ts_ns`` over one entity window (``StreamFeatures.window_of``) of every
    view in ``views`` (default: the state's first), in one dict: a name declared in two views
    has one definition (``FeaturesConfig`` refuses anything else)."""
    if len(views) < 2:
        return state.lookup_events(win, ts_ns, views[0] if views else None)
    out: dict[str, float] = {}
    for view in views:
        out |= state.lookup_events(win, ts_ns, view)
    return out


def _redacted(url: str) -> str:
    """``url`` without a password (``redis://:secret@host`` -> ``redis://host``)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"
