"""The online service's Redis reads under trouble, against a real redis-server.

One shared pipelined connection serves every request's ``MGET`` (``adapters.redis_reads``).
A slow reply must cost only the call whose budget it exceeded, not the calls queued behind
it; a connection that breaks while calls are pending must be replaced and the reads (which
are idempotent) retried once within their budget. The window answers come from the value
just read even when a parsed copy of an earlier value is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pandas as pd
import pytest
import redis

from adapters.feature_store import AsyncRedisFeatureReader, RedisFeatureStore
from adapters.redis_reads import ConnectionLost, PipelinedRedis
from mlops.datagen import generate
from mlops.features import FeatureSet, StreamFeatures, compute_offline, timestamps_ns
from mlops.settings import load_settings

REPO = Path(__file__).resolve().parent.parent
FEATURES_YAML = REPO / "configs" / "features.yaml"


@pytest.fixture(scope="module")
def fs() -> FeatureSet:
    return FeatureSet.from_settings(load_settings(FEATURES_YAML, environ={}))


@pytest.fixture
def server(redis_url: str) -> redis.Redis:
    """An admin client on the module's redis-server; unpauses it after the test."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.execute_command("CLIENT", "UNPAUSE")
    client.close()


def test_a_slow_reply_fails_only_the_call_whose_budget_it_exceeded(redis_url: str, server: redis.Redis):
    """Redis paused for 1.4 s (CLIENT PAUSE ALL): the call made at the start times out at its
    own 1 s budget; seven calls queued behind it on the same connection 0.7 s later keep
    waiting and get their values when Redis resumes; the next call after that succeeds."""
    server.set("slow:k", b"v")

    async def scenario() -> None:
        client = PipelinedRedis(redis_url, 1.0)
        try:
            assert await client.mget([b"slow:k"]) == [b"v"]
            server.execute_command("CLIENT", "PAUSE", "1400", "ALL")
            started = time.monotonic()
            first = asyncio.ensure_future(client.mget([b"slow:k"]))
            await asyncio.sleep(0.7)
            queued = [asyncio.ensure_future(client.mget([b"slow:k", b"slow:none"])) for _ in range(7)]
            with pytest.raises(TimeoutError):
                await first
            assert 0.9 < time.monotonic() - started < 1.35
            assert await asyncio.gather(*queued) == [[b"v", None]] * 7
            assert await client.mget([b"slow:k"]) == [b"v"]
        finally:
            await client.close()

    asyncio.run(scenario())


class Proxy:
    """A TCP relay to the real redis-server that can hold replies and drop client connections."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.hold = False
        self.clients: list[asyncio.StreamWriter] = []
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: bool) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                while replies and self.hold:
                    await asyncio.sleep(0.01)
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.clients.append(writer)
        up_r, up_w = await asyncio.open_connection(*self.target)
        await asyncio.gather(self._pipe(reader, up_w, False), self._pipe(up_r, writer, True))

    def drop_clients(self) -> None:
        """Reset every client connection (as a crashed middlebox or a killed server would)."""
        for w in self.clients:
            w.transport.abort()
        self.clients.clear()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            self.drop_clients()
            self.server.close()


def test_reads_pending_on_a_broken_connection_are_retried_once_on_a_new_one(
    redis_url: str, server: redis.Redis
):
    """Three reads are pending (their replies held) when the connection is reset: each is sent
    again on one new connection and answered within its budget; a connection reset on every
    attempt fails the read after its one retry, in one line."""
    server.set("drop:k", b"kept")
    opts = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs
    proxy = Proxy(opts["host"], opts["port"])

    async def scenario() -> None:
        async with proxy.running() as url:
            client = PipelinedRedis(url, 2.0)
            try:
                assert await client.mget([b"drop:k"]) == [b"kept"]
                proxy.hold = True
                pending = [asyncio.ensure_future(client.mget([b"drop:k"])) for _ in range(3)]
                await asyncio.sleep(0.2)
                assert not any(p.done() for p in pending)
                proxy.drop_clients()
                proxy.hold = False
                assert await asyncio.gather(*pending) == [[b"kept"]] * 3
                assert client.connects == 2 and proxy.accepted == 2

                proxy.hold = True
                again = asyncio.ensure_future(client.mget([b"drop:k"]))
                for _ in range(2):  # the first attempt and its retry
                    await asyncio.sleep(0.2)
                    proxy.drop_clients()
                with pytest.raises(ConnectionLost, match="connection lost"):
                    await again
                proxy.hold = False
                assert await client.mget([b"drop:k"]) == [b"kept"]
            finally:
                await client.close()

    asyncio.run(scenario())


class Checkpointed:
    """600 generated events, the first 500 checkpointed to Redis under a fresh prefix, and a
    user seen among them whose next event comes later (looked up just after it)."""

    def __init__(self, redis_url: str, fs: FeatureSet, seed: int, name: str):
        self.fs = fs
        self.events = generate(600, seed=seed).sort_values("event_time", kind="stable").reset_index(drop=True)
        self.prefix = f"{name}{time.time_ns()}"
        self.store = RedisFeatureStore.from_url(redis_url, fs, self.prefix)
        self.state = StreamFeatures(fs)
        self.users, self.ts = self.events["user_id"], timestamps_ns(self.events["event_time"])
        self.state.replay(self.users[:500], self.ts[:500], {"amount": self.events["amount"][:500]})
        self.store.save(self.state, {"t": 500})
        seen = set(self.users[:500])
        self.later = next(i for i in range(500, len(self.events)) if self.users[i] in seen)
        self.user, self.at = self.users[self.later], int(self.ts[self.later]) + 1

    def checkpoint_through_later(self) -> None:
        """The stream takes the events up to the user's next one and checkpoints."""
        for i in range(500, self.later + 1):
            self.state.update(self.users[i], int(self.ts[i]), {"amount": float(self.events["amount"][i])})
        self.store.save(self.state, {"t": self.later + 1})

    def offline(self, upto: int) -> dict[str, float]:
        """The user's features at ``at`` computed offline from the first ``upto`` events."""
        query = pd.DataFrame({"user_id": [self.user], "event_time": [pd.Timestamp(self.at)]})
        return compute_offline(self.fs, self.events.iloc[:upto], query).to_pandas().iloc[0].to_dict()


def test_a_changed_window_is_read_anew_and_unknown_ids_are_not_kept(redis_url: str, fs: FeatureSet):
    """The reader keeps parsed windows only with the bytes they came from: after the stream
    checkpoints one more event of a user, the next lookup answers with it (equal to offline);
    ids Redis does not hold get the empty window and are not kept, and at most
    ``cache_entities`` windows are."""
    c = Checkpointed(redis_url, fs, 11, "reads")
    user, at = c.user, c.at

    async def scenario() -> None:
        reader = AsyncRedisFeatureReader(redis_url, fs, c.prefix, 2.0, cache_entities=3)
        try:
            (before,) = await reader.lookup_many([(user, at)])
            assert before == pytest.approx(c.offline(500), rel=1e-12)
            c.checkpoint_through_later()
            (after,) = await reader.lookup_many([(user, at)])
            assert after == pytest.approx(c.offline(c.later + 1), rel=1e-12)
            assert after["user_txn_count_24h"] == before["user_txn_count_24h"] + 1
            empty = await reader.lookup_many([(f"nobody{i}", at) for i in range(50)])
            assert all(e["user_txn_count_24h"] == 0 for e in empty)
            assert set(reader._windows) == {user}
            others = list(c.users[:500].unique()[:6])
            await reader.lookup_many([(u, at) for u in others])
            assert len(reader._windows) == 3
        finally:
            await reader.close()

    asyncio.run(scenario())


def test_repeat_entities_are_answered_from_memory_until_the_checkpoint_changes(
    redis_url: str, fs: FeatureSet
):
    """With the meta key watched every 0.1 s, 300 lookups of one user cost Redis one MGET of its
    window (the server's own command count says so, besides the watch's meta reads); after
    the stream checkpoints one more event of that user, the answers change within the
    watch interval plus the timeout, and equal offline; an id Redis does not hold is read
    every time."""
    c = Checkpointed(redis_url, fs, 12, "watch")
    user, at = c.user, c.at
    admin = redis.Redis.from_url(redis_url)

    def mgets() -> int:
        return int(admin.info("commandstats").get("cmdstat_mget", {}).get("calls", 0))

    async def scenario() -> None:
        reader = AsyncRedisFeatureReader(redis_url, fs, c.prefix, 0.5)
        watch = asyncio.ensure_future(reader.watch(0.1))
        try:
            await asyncio.sleep(0.05)
            expected = c.offline(500)
            calls, started = mgets(), time.monotonic()
            for _ in range(300):
                (got,) = await reader.lookup_many([(user, at)])
                assert got == pytest.approx(expected, rel=1e-12)
            polls = (time.monotonic() - started) / 0.1 + 2
            assert reader.reads == 1 and mgets() - calls <= 1 + polls

            expected = c.offline(c.later + 1)
            c.checkpoint_through_later()
            saved = time.monotonic()
            while (await reader.lookup_many([(user, at)]))[0] != pytest.approx(expected, rel=1e-12):
                assert time.monotonic() - saved < 0.6 + 0.5, "the new checkpoint was not seen in time"
                await asyncio.sleep(0.01)
            reads = reader.reads
            for _ in range(5):
                await reader.lookup_many([("nobody", at)])
            assert reader.reads == reads + 5 and "nobody" not in reader._windows
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            await reader.close()
        assert reader.max_staleness == 0.0

    asyncio.run(scenario())
