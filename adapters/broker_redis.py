"""The server broker: Redis Streams behind the ``Broker`` interface.

A topic is one Redis stream whose entry IDs are ``0-<offset + 1>``: a Lua script assigns
them densely at publish (atomic, so concurrent publishers never share an offset), which keeps
offsets as plain integers for the parts and checkpoints of ``tasks.stream``.

Consumption uses a Redis consumer group per (topic, group):

* new messages are read with ``XREADGROUP ... COUNT n`` (bounded: the consumer never holds
  more than the batch it asked for; nothing is prefetched);
* the commit ``XACK``s every entry below the new offset and records the offset in one Lua
  script (atomic; a commit backwards is refused). The consumer calls it only after the
  batch's output part is written and fsynced, so an acked entry is always a durable one;
* entries delivered to a consumer that died before its commit stay pending; the next poll
  takes them over with ``XAUTOCLAIM`` (from the committed offset, in ID order) before it
  reads new ones, so they are delivered again, in order, with nothing skipped.

Replays below the committed offset (the window state catching up to the commit) read the
stream with ``XRANGE``. One consumer at a time per group: its window state is the group's.
Redis errors become ``BrokerError``.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable
from typing import Any

from adapters.broker import BrokerError, Message

_PUBLISH = """
local n = tonumber(redis.call('GET', KEYS[2]) or '0')
for i = 1, #ARGV, 2 do
  n = n + 1
  redis.call('XADD', KEYS[1], '0-' .. n, 'k', ARGV[i], 'p', ARGV[i + 1])
end
redis.call('SET', KEYS[2], n)
return n
"""

# KEYS: stream, offsets hash. ARGV: group, new offset. Returns the new offset, or -(committed + 1).
_COMMIT = """
local cur = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local new = tonumber(ARGV[2])
if new < cur then return -(cur + 1) end
local ids = {}
for n = cur + 1, new do
  ids[#ids + 1] = '0-' .. n
  if #ids == 500 then redis.call('XACK', KEYS[1], ARGV[1], unpack(ids)); ids = {} end
end
if #ids > 0 then redis.call('XACK', KEYS[1], ARGV[1], unpack(ids)) end
redis.call('HSET', KEYS[2], ARGV[1], new)
return new
"""

PUBLISH_CHUNK = 5_000


def _offset(entry_id: bytes | str) -> int:
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = raw.partition("-")
    if ms != "0":
        raise BrokerError(f"stream entry {raw!r} was not published by this broker")
    return int(seq) - 1


def _sid(offset: int) -> str:
    return f"0-{offset + 1}"


class RedisBroker:
    """Topics as Redis streams, group offsets as ``XACK`` + a committed-offset hash (see module doc)."""

    def __init__(self, client: Any, prefix: str = "mlops:stream", consumer: str | None = None):
        self.client = client
        self.prefix = prefix
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self._groups: set[tuple[str, str]] = set()
        try:
            self._publish = client.register_script(_PUBLISH)
            self._commit = client.register_script(_COMMIT)
        except Exception as exc:  # translated once, here
            raise BrokerError(f"redis: cannot prepare the broker scripts ({exc})") from None

    @classmethod
    def from_url(cls, url: str, prefix: str = "mlops:stream", consumer: str | None = None) -> RedisBroker:
        """A broker on the Redis server at ``url`` (``redis://host:port/db``)."""
        import redis

        return cls(redis.Redis.from_url(url, socket_timeout=30), prefix, consumer)

    def _key(self, topic: str) -> str:
        return f"{self.prefix}:{topic}"

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import redis

        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise BrokerError(f"redis: cannot {what} ({exc})") from None

    def publish(self, topic: str, messages: Iterable[tuple[str, dict[str, Any]]]) -> int:
        """Append the messages (atomically per chunk of 5,000); returns the topic's new end offset."""
        keys = [self._key(topic), f"{self._key(topic)}:end"]
        end = self.end_offset(topic)
        args: list[str] = []
        for key, payload in messages:
            try:
                args += [str(key), json.dumps(payload, separators=(",", ":"))]
            except (TypeError, ValueError) as exc:
                raise BrokerError(f"redis: cannot publish to {topic!r} ({exc})") from None
            if len(args) >= 2 * PUBLISH_CHUNK:
                end = int(self._call(f"publish to {topic!r}", self._publish, keys=keys, args=args))
                args = []
        if args:
            end = int(self._call(f"publish to {topic!r}", self._publish, keys=keys, args=args))
        return end

    def end_offset(self, topic: str) -> int:
        """The offset the next published message of ``topic`` will get."""
        raw = self._call("read the end offset", self.client.get, f"{self._key(topic)}:end")
        return int(raw or 0)

    def committed(self, topic: str, group: str) -> int:
        """The group's committed offset (0 if it never committed)."""
        raw = self._call("read an offset", self.client.hget, f"{self._key(topic)}:offsets", group)
        return int(raw or 0)

    def _ensure_group(self, topic: str, group: str) -> None:
        import redis

        if (topic, group) in self._groups:
            return
        try:
            self.client.xgroup_create(self._key(topic), group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise BrokerError(f"redis: cannot create group {group!r} of {topic!r} ({exc})") from None
        except redis.RedisError as exc:
            raise BrokerError(f"redis: cannot create group {group!r} of {topic!r} ({exc})") from None
        self._groups.add((topic, group))

    def poll(self, topic: str, group: str, max_messages: int, start: int | None = None) -> list[Message]:
        """Up to ``max_messages`` from ``start`` (default: the committed offset), in offset order.

        Below the committed offset this is a replay (``XRANGE``); from it on, pending entries
        (delivered, never committed) are claimed first (``XAUTOCLAIM``), then new ones read
        (``XREADGROUP``), at most ``max_messages`` in all.
        """
        committed = self.committed(topic, group)
        first = committed if start is None else start
        key = self._key(topic)
        if first < committed:
            rows = self._call(f"read {topic!r}", self.client.xrange, key, min=_sid(first), count=max_messages)
            return self._messages(topic, rows, first)
        self._ensure_group(topic, group)
        claimed = self._call(
            f"claim pending entries of {topic!r}",
            self.client.xautoclaim,
            key,
            group,
            self.consumer,
            min_idle_time=0,
            start_id=_sid(first),
            count=max_messages,
        )
        rows = list(claimed[1])
        if len(rows) < max_messages:
            fresh = self._call(
                f"read {topic!r}",
                self.client.xreadgroup,
                group,
                self.consumer,
                {key: ">"},
                count=max_messages - len(rows),
            )
            for _stream, entries in fresh or []:
                rows += entries
        return self._messages(topic, rows, first)

    def _messages(self, topic: str, rows: list, first: int) -> list[Message]:
        out: list[Message] = []
        for entry_id, fields in rows:
            if not fields:  # an entry trimmed away while pending
                raise BrokerError(f"redis: {topic!r} entry {entry_id!r} was deleted before it was consumed")
            out.append(Message(_offset(entry_id), fields[b"k"].decode(), json.loads(fields[b"p"])))
        expected = list(range(first, first + len(out)))
        if [m.offset for m in out] != expected:
            got = [m.offset for m in out[:3]]
            raise BrokerError(f"redis: {topic!r} delivered offsets {got}.. where {first} was next")
        return out

    def commit(self, topic: str, group: str, offset: int) -> None:
        """Acknowledge every entry below ``offset`` and record it; moving it backwards is refused."""
        self._ensure_group(topic, group)
        key = self._key(topic)
        res = int(
            self._call(
                f"commit {topic!r}/{group!r}",
                self._commit,
                keys=[key, f"{key}:offsets"],
                args=[group, offset],
            )
        )
        if res < 0:
            raise BrokerError(f"{topic!r}/{group!r}: commit {offset} is behind the committed {-res - 1}")

    def pending(self, topic: str, group: str) -> int:
        """Entries delivered to the group and not yet committed."""
        self._ensure_group(topic, group)
        info = self._call("read pending entries", self.client.xpending, self._key(topic), group)
        return int(info["pending"])

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()


def redis_server_command(host: str, port: int, folder: Any, appendfsync: str = "always") -> tuple[str, ...]:
    """``redis-server`` on ``host:port`` keeping its append-only log in ``folder`` (created here)."""
    import shutil
    from pathlib import Path

    binary = shutil.which("redis-server")
    if binary is None:
        raise BrokerError("redis-server is not installed (apt-get install -y redis-server)")
    Path(folder).mkdir(parents=True, exist_ok=True)
    return (
        binary,
        "--bind",
        host,
        "--port",
        str(port),
        "--dir",
        str(folder),
        "--appendonly",
        "yes",
        "--appendfsync",
        appendfsync,
        "--save",
        "",
        "--protected-mode",
        "yes",
    )


def redis_ready(url: str) -> bool:
    """Whether the Redis server at ``url`` answers PING."""
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=2).ping())
    except redis.RedisError:
        return False
