"""A pipelined asyncio Redis connection for one hot read: ``MGET`` from the online service.

redis-py's asyncio client cost the service about 0.4 ms of CPU per call (pool checkout,
per-read timers, a pure-Python reply parser): as much again as the rest of a request on a
busy 2-core machine (docs/design/features.md, "Online lookup"). Here every caller queues its
command on one shared connection and awaits its reply; replies come back in order (RESP),
so a FIFO of futures matches them. Commands queued in the same event-loop iteration go out
in one write. Only what ``MGET`` needs is implemented: AUTH and SELECT at connect, RESP2
bulk strings, arrays, integers, simple strings and errors.

Every call has its own budget (``timeout`` seconds from the call): one watchdog timer per
connection fails exactly the calls whose budget ran out (their replies, when they come, are
skipped in order) and nothing else, so one slow reply costs only its own caller. A
connection that received nothing during a call's whole budget is retired: new calls go to a
fresh connection, the old one is closed once its calls are answered or expired. A connection
lost with calls pending (reset, closed by the server) fails them with ``ConnectionLost``;
``mget`` (an idempotent read) then retries once on a fresh connection within what is left of
its budget.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any


class RespError(Exception):
    """Redis answered an error reply, or the connection failed or broke."""


class ConnectionLost(RespError):
    """The connection closed or broke before the reply came (the command may not have run)."""


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
    """One Redis connection: queued commands, a FIFO of (future, deadline) and a watchdog timer."""

    def __init__(self, timeout: float = 1.0) -> None:
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiters: deque[tuple[asyncio.Future, float]] = deque()
        self.closed = False  # broken or closed: no new call may use it
        self.retired = False  # no new call may use it; closed once its calls are settled
        self.last_data = 0.0  # loop time of the last bytes received
        self._out: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def usable(self) -> bool:
        """Whether a new call may be sent on it."""
        return not (self.closed or self.retired)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        self.last_data = self._loop.time()

    def send(self, data: bytes, deadline: float | None = None) -> asyncio.Future:
        """Queue ``data`` (one command); the future of its reply, failed with ``TimeoutError``
        at ``deadline`` (loop time; default ``timeout`` from now) if no reply came by then."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.timeout
        future = loop.create_future()
        if self.closed:
            future.set_exception(ConnectionLost("connection closed"))
            return future
        self.waiters.append((future, deadline))
        if not self._out:
            loop.call_soon(self._flush)
        self._out.append(data)
        timer = self._timer
        if timer is None or deadline < timer.when():
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._expire)
        return future

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and not self.closed and self.transport is not None:
            self.transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        if self._loop is not None:
            self.last_data = self._loop.time()
        pos = 0
        waiters = self.waiters
        try:
            while waiters:
                reply, nxt = parse_reply(buf, pos)
                if reply is _INCOMPLETE:
                    break
                pos = nxt
                future = waiters.popleft()[0]
                if not future.done():  # a caller that timed out is skipped, the order kept
                    future.set_result(reply)
        except (RespError, ValueError) as exc:
            self.fail(RespError(f"malformed reply ({exc})"))
            return
        del buf[:pos]
        if self.retired:
            self._close_if_settled()

    def _expire(self) -> None:
        """Fail the calls whose deadline passed; retire the connection if it stayed silent
        through a whole budget; re-arm for the next deadline."""
        self._timer = None
        loop = self._loop
        if loop is None or self.closed:
            return
        now = loop.time()
        silent = False
        next_deadline = None
        for future, deadline in self.waiters:
            if future.done():
                continue
            if deadline > now:
                if next_deadline is None or deadline < next_deadline:
                    next_deadline = deadline
                continue
            future.set_exception(TimeoutError())
            future.exception()  # retrieved here: a caller that went away logs nothing
            if self.last_data < deadline - self.timeout:
                silent = True
        if silent:
            self.retired = True
        if self.retired:
            self._close_if_settled()
        if next_deadline is not None and not self.closed:
            self._timer = loop.call_at(next_deadline, self._expire)

    def _close_if_settled(self) -> None:
        if all(f.done() for f, _ in self.waiters):
            self.fail(ConnectionLost("retired"))

    def fail(self, exc: Exception) -> None:
        """Close the connection; every call still waiting fails with ``exc``."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.waiters:
            future = self.waiters.popleft()[0]
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionLost(f"connection lost ({exc or 'closed by the server'})"))


class PipelinedRedis:
    """``MGET`` on one shared, pipelined connection to the Redis server at ``url``; every call
    bounded by ``timeout`` seconds (see the module doc)."""

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
        self.connects = 0  # connections opened so far
        self._conn: _Connection | None = None
        self._lock: asyncio.Lock | None = None

    async def _connection(self, deadline: float) -> _Connection:
        conn = self._conn
        if conn is not None and conn.usable:
            return conn
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            conn = self._conn
            if conn is None or not conn.usable:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise TimeoutError()
                conn = self._conn = await asyncio.wait_for(self._connect(deadline), left)
            return conn

    async def _connect(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        timeout = self.timeout
        try:
            _, conn = await loop.create_connection(
                lambda: _Connection(timeout), self.host, self.port, ssl=self.ssl
            )
        except OSError as exc:
            raise RespError(f"cannot connect to {self.host}:{self.port} ({exc.strerror or exc})") from None
        self.connects += 1
        hello = []
        if self.password is not None:
            user = [self.username.encode()] if self.username else []
            hello.append(conn.send(command(b"AUTH", *user, self.password.encode()), deadline))
        if self.db:
            hello.append(conn.send(command(b"SELECT", str(self.db).encode()), deadline))
        try:
            replies = await asyncio.gather(*hello)
        except BaseException:
            conn.fail(RespError("closed"))
            raise
        for reply in replies:
            if isinstance(reply, RespError):
                conn.fail(reply)
                raise reply
        return conn

    async def mget(self, keys: list[bytes]) -> list[bytes | None]:
        """The values of ``keys`` (None for a missing key); ``RespError`` when Redis cannot
        answer, ``TimeoutError`` when it did not within the budget."""
        data = command(b"MGET", *keys)
        deadline = asyncio.get_running_loop().time() + self.timeout
        try:
            reply = await (await self._connection(deadline)).send(data, deadline)
        except ConnectionLost:  # an idempotent read: once more on a fresh connection
            reply = await (await self._connection(deadline)).send(data, deadline)
        if isinstance(reply, RespError):
            raise reply
        return reply

    async def close(self) -> None:
        """Close the connection (pending calls fail)."""
        if self._conn is not None:
            self._conn.fail(RespError("closed"))
            self._conn = None
