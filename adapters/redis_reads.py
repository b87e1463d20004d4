"""A pipelined asyncio Redis connection for one hot read: ``MGET`` from the online service.

redis-py's asyncio client cost the service about 0.4 ms of CPU per call (pool checkout,
per-read timers, a pure-Python reply parser): as much again as the rest of a request on a
busy 2-core machine (docs/design/features.md, "Online lookup"). Here every caller writes its
command on one shared connection at once and awaits its reply; replies come back in order
(RESP), so a FIFO of futures matches them. Only what ``MGET`` needs is implemented: AUTH and
SELECT at connect, RESP2 bulk strings, arrays, integers, simple strings and errors.

A call not answered within ``timeout`` closes the connection (every pending call fails at
once, the next one reconnects), so a hung server costs one timeout, never a stuck loop.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any


class RespError(Exception):
    """Redis answered an error reply, or the connection failed or broke."""


_INCOMPLETE = object()


def command(*args: bytes) -> bytes:
    """One RESP command (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def parse_reply(buf: bytes | bytearray, pos: int) -> tuple[Any, int]:
    """The reply starting at ``pos`` and the position after it; ``(_INCOMPLETE, pos)`` when the
    buffer does not hold all of it yet. An error reply is returned as a ``RespError``."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return _INCOMPLETE, pos
    kind, head, nxt = buf[pos], bytes(buf[pos + 1 : end]), end + 2
    if kind == 0x24:  # $ bulk string
        n = int(head)
        if n < 0:
            return None, nxt
        if len(buf) < nxt + n + 2:
            return _INCOMPLETE, pos
        return bytes(buf[nxt : nxt + n]), nxt + n + 2
    if kind == 0x2A:  # * array
        n = int(head)
        if n < 0:
            return None, nxt
        items = []
        for _ in range(n):
            item, nxt = parse_reply(buf, nxt)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        return items, nxt
    if kind == 0x2B:  # + simple string
        return head.decode(), nxt
    if kind == 0x3A:  # : integer
        return int(head), nxt
    if kind == 0x2D:  # - error
        return RespError(head.decode(errors="replace")), nxt
    raise RespError(f"unexpected reply type {chr(kind)!r}")


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiters: deque[asyncio.Future] = deque()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.waiters.append(future)
        assert self.transport is not None
        self.transport.write(data)
        return future

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        pos = 0
        try:
            while self.waiters:
                reply, nxt = parse_reply(buf, pos)
                if reply is _INCOMPLETE:
                    break
                pos = nxt
                future = self.waiters.popleft()
                if not future.done():  # a caller that timed out is skipped, the order kept
                    future.set_result(reply)
        except (RespError, ValueError) as exc:
            self.fail(RespError(f"malformed reply ({exc})"))
            return
        del buf[:pos]

    def fail(self, exc: Exception) -> None:
        self.closed = True
        while self.waiters:
            future = self.waiters.popleft()
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RespError(f"connection lost ({exc or 'closed by the server'})"))


class PipelinedRedis:
    """``MGET`` on one shared, pipelined connection to the Redis server at ``url``."""

    def __init__(self, url: str, timeout: float):
        from redis.connection import SSLConnection, parse_url

        opts = parse_url(url)
        self.host = opts.get("host", "localhost")
        self.port = int(opts.get("port", 6379))
        self.db = int(opts.get("db", 0))
        self.username = opts.get("username")
        self.password = opts.get("password")
        self.ssl = ssl.create_default_context() if opts.get("connection_class") is SSLConnection else None
        self.timeout = timeout
        self._conn: _Connection | None = None
        self._lock: asyncio.Lock | None = None

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = await asyncio.wait_for(self._connect(), self.timeout)
            return self._conn

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(_Connection, self.host, self.port, ssl=self.ssl)
        except OSError as exc:
            raise RespError(f"cannot connect to {self.host}:{self.port} ({exc.strerror or exc})") from None
        hello = []
        if self.password is not None:
            user = [self.username.encode()] if self.username else []
            hello.append(conn.send(command(b"AUTH", *user, self.password.encode())))
        if self.db:
            hello.append(conn.send(command(b"SELECT", str(self.db).encode())))
        for reply in await asyncio.gather(*hello):
            if isinstance(reply, RespError):
                conn.fail(reply)
                raise reply
        return conn

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        """The values of ``keys`` (None for a missing key); ``RespError`` or ``TimeoutError`` when
        Redis does not answer in time."""
        conn = await self._connection()
        future = conn.send(command(b"MGET", *(k.encode() for k in keys)))
        try:
            reply = await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            conn.fail(RespError("timed out"))
            raise
        if isinstance(reply, RespError):
            raise reply
        return reply

    async def close(self) -> None:
        """Close the connection (pending calls fail)."""
        if self._conn is not None:
            self._conn.fail(RespError("closed"))
            self._conn = None
