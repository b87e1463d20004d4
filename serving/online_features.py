"""Online window-feature lookup for the service: the features a raw transaction did not send.

A model whose ONNX graph takes window features (inputs named like the windows of its feature
view: ``features.windows`` or one of ``features.extra_views``) gets them, for each row that
lacks them, from the stream consumer group's window state
(``serving.online_features.topic``/``group``) in the store ``features.store`` configures. The
state keeps the history of every declared view; a request whose models need several views
(a canary from a model on one view to a model on another) reads each entity once and gets
the values of each of them:

* embedded: the group's checkpoint file. A background task checks every
  ``refresh_seconds`` whether the stream published a new checkpoint and then indexes it in
  a thread (``CheckpointIndex``, milliseconds); requests read the index in memory and never
  touch the file.
* Redis: one ``MGET`` per request (every looked-up entity plus the meta key) on a pipelined
  asyncio connection, bounded by ``timeout_seconds``; a background task reads the meta key
  every ``refresh_seconds`` and, while the checkpoint is unchanged, entities already read
  are answered from memory (``AsyncRedisFeatureReader``).

Lookups are read-only: the service holds no handle that writes state, and the request
decides only the entity id (validated, ``mlops.request_validation.ENTITY_ID``) and the time,
never the store, prefix, topic or group. A row at time ``t`` gets the features of the events
strictly before ``t`` (``t`` defaults to the time of the request); an entity the state has
never seen gets the empty-window values, like offline for an entity with no prior events.
A store that cannot answer (down, no checkpoint yet, built for other declarations) is a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, MutableMapping, Sequence
from typing import Protocol

from adapters.feature_store import (
    AsyncRedisFeatureReader,
    CheckpointIndex,
    EmbeddedFeatureStore,
    FeatureStoreError,
    state_store,
)
from mlops.features import FeatureSet, StateMismatch, feature_views
from mlops.request_validation import InvalidRequest, OnlineKeys
from mlops.settings import RedisStateStore, Settings
from serving.errors import FeaturesUnavailable

log = logging.getLogger(__name__)


class Reader(Protocol):
    """Reads the features of many (entity, time ns) pairs from one state store."""

    async def lookup_many(
        self, keys: Sequence[tuple[str, int]], views: Sequence[FeatureSet] = ()
    ) -> list[dict[str, float]]:
        """The features of each (entity, time), of every view in ``views`` (default: the first
        declared); ``FeatureStoreError`` when the store cannot answer."""
        ...


class EmbeddedReader:
    """Lookups from an in-memory index of the group's checkpoint file, re-indexed when it changes."""

    def __init__(self, store: EmbeddedFeatureStore):
        self.store = store
        self.index: CheckpointIndex | None = None
        self.stamp: tuple[int, int, int] | None = None
        self.problem = f"no window state checkpoint at {store.path} yet"
        self.reloads = 0

    def refresh(self) -> bool:
        """Index the checkpoint if it changed since the last call (blocking); whether it did."""
        stamp = self.store.stamp()
        if stamp == self.stamp:
            return False
        self.stamp = stamp
        try:
            self.index = None if stamp is None else self.store.index()
        except (FeatureStoreError, StateMismatch) as exc:
            self.index, self.problem = None, str(exc)
            log.warning("online features: %s", exc)
            return True
        if self.index is None:
            self.problem = f"no window state checkpoint at {self.store.path} yet"
        self.reloads += 1
        return True

    async def watch(self, every: float) -> None:
        """Refresh every ``every`` seconds, off the event loop, until cancelled."""
        while True:
            await asyncio.sleep(every)
            try:
                await asyncio.to_thread(self.refresh)
            except OSError as exc:  # a file system hiccup: keep the last index, try again
                log.warning("online features: cannot check %s (%s)", self.store.path, exc)

    async def lookup_many(
        self, keys: Sequence[tuple[str, int]], views: Sequence[FeatureSet] = ()
    ) -> list[dict[str, float]]:
        """The features of each (entity, time), of every view in ``views``, from the current index."""
        index = self.index
        if index is None:
            raise FeatureStoreError(self.problem)
        if len(views) < 2:
            view = views[0] if views else None
            return [index.lookup(entity, ts, view) for entity, ts in keys]
        out = []
        for entity, ts in keys:
            found: dict[str, float] = {}
            for view in views:
                found |= index.lookup(entity, ts, view)
            out.append(found)
        return out


class OnlineFeatures:
    """Fills the window features rows lack from the configured store (see module doc).

    ``views`` are the declared feature views, ``fs`` (``features.windows``) first; a request
    may carry the window features of any of them."""

    def __init__(
        self,
        fs: FeatureSet,
        reader: Reader,
        refresh_seconds: float = 0.5,
        extra_views: Sequence[FeatureSet] = (),
    ):
        self.fs = fs
        self.views = (fs, *extra_views)
        self.reader = reader
        self.refresh_seconds = refresh_seconds
        names = tuple(dict.fromkeys(n for v in self.views for n in v.names))
        self.keys = OnlineKeys(names, fs.entity_column, fs.timestamp_column)
        self._watch: asyncio.Task | None = None

    @classmethod
    def for_settings(cls, settings: Settings) -> OnlineFeatures | None:
        """The lookup the config declares, or None when it declares no window features."""
        if not settings.features.windows:
            return None
        fs, *extra = feature_views(settings)  # the state serves every declared view
        cfg = settings.serving.online_features
        spec = settings.features.store
        if isinstance(spec, RedisStateStore):
            prefix = f"{spec.prefix}:{cfg.topic}:{cfg.group}"
            reader = AsyncRedisFeatureReader(spec.url, fs, prefix, cfg.timeout_seconds, extra)
            return cls(fs, reader, cfg.refresh_seconds, extra)
        store = state_store(settings, fs, cfg.topic, cfg.group)
        assert isinstance(store, EmbeddedFeatureStore)
        return cls(fs, EmbeddedReader(store), cfg.refresh_seconds, extra)

    def prepare(self) -> str:
        """Read the store's current state once (blocking: before serving); what is there."""
        if isinstance(self.reader, EmbeddedReader):
            self.reader.refresh()
            index = self.reader.index
            return (
                self.reader.problem
                if index is None
                else f"{index.entities} entities in {self.reader.store.path}"
            )
        assert isinstance(self.reader, AsyncRedisFeatureReader)
        return f"redis {self.reader.where}"

    def start(self) -> None:
        """Start watching the store for new checkpoints (on the running loop)."""
        if isinstance(self.reader, EmbeddedReader | AsyncRedisFeatureReader):
            self._watch = asyncio.get_running_loop().create_task(
                self.reader.watch(self.refresh_seconds), name="online-features-watch"
            )

    async def stop(self) -> None:
        """Stop watching; close the Redis connections."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if isinstance(self.reader, AsyncRedisFeatureReader):
            await self.reader.close()

    async def fill(
        self,
        rows: Sequence[MutableMapping[str, object]],
        entities: Sequence[str | None],
        times_ns: Sequence[int | None],
        needed: Sequence[str],
        where: Callable[[int], str],
        views: Sequence[FeatureSet] = (),
    ) -> int:
        """Put the ``needed`` window features each row lacks into it, looked up (of each of
        ``views``, default the first declared, in one read) for its entity at its time (default:
        now); how many rows were looked up. ``InvalidRequest`` (422) names the entity field of
        a row that lacks both; ``FeaturesUnavailable`` (503) when the store cannot answer."""
        todo: list[int] = []
        for i, row in enumerate(rows):
            if all(n in row for n in needed):
                continue
            if entities[i] is None:
                missing = [n for n in needed if n not in row]
                raise InvalidRequest(
                    f"{where(i)}: missing field '{self.fs.entity_column}': the model needs the window "
                    f"feature(s) {', '.join(missing)}; send them, or the entity id to look them up"
                )
            todo.append(i)
        if not todo:
            return 0
        if len(views) == 1 and views[0] is self.fs:
            views = ()  # the first view: the reader's own fast path
        now = time.time_ns()
        keys = [(str(entities[i]), now if times_ns[i] is None else int(times_ns[i])) for i in todo]
        try:
            values = await self.reader.lookup_many(keys, views)
        except (FeatureStoreError, StateMismatch) as exc:
            raise FeaturesUnavailable(f"online feature store unavailable: {exc}") from None
        for i, found in zip(todo, values, strict=True):
            row = rows[i]
            for name in needed:
                if name not in row:
                    row[name] = found[name]
        return len(todo)
