"""Kafka behind the ``Broker`` interface, through the optional ``confluent-kafka`` client.

``confluent-kafka`` is not a dependency of the platform: it is imported when a Kafka broker
is configured (``stream.broker: {kind: kafka, bootstrap_servers: ...}``), and its absence is
one ``BrokerError`` line. Mapping of the interface onto Kafka:

* a topic is read as its partition 0 (one ordered log, as ``tasks.stream`` needs: the
  window state of a group is one consumer's); Kafka offsets are the interface's offsets;
* ``poll(start=...)`` assigns the partition at ``start`` (``assign`` + ``seek``, no group
  rebalancing) and ``consume``s at most ``max_messages`` (bounded: the client's own fetch
  queue is limited with ``queued.max.messages.kbytes`` / ``fetch.max.bytes`` options);
* ``commit(offset)`` is a synchronous ``commit(offsets=[TopicPartition(topic, 0, offset)])``
  after the output part is durable: Kafka's committed offset is "the next message needed",
  the same convention as the interface; auto-commit is always off;
* ``committed`` / ``end_offset`` are ``committed()`` and the high watermark.

Only this mapping is tested here, against a small in-process stand-in of the client's
``Consumer``/``Producer`` API (``tests/test_stream_kafka.py``); no Kafka cluster runs on this
machine, so nothing is tested against a live Kafka.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from adapters.broker import BrokerError, Message

PARTITION = 0


def _client_module() -> Any:
    try:
        import confluent_kafka
    except ImportError:
        raise BrokerError(
            "stream.broker kind kafka needs the confluent-kafka client: pip install confluent-kafka"
        ) from None
    return confluent_kafka


class KafkaBroker:
    """Topics and group offsets in a Kafka cluster (see module doc)."""

    def __init__(self, bootstrap_servers: str, options: dict[str, str] | None = None, client: Any = None):
        self.kafka = client or _client_module()
        self.conf = {"bootstrap.servers": bootstrap_servers, **(options or {})}
        self._consumers: dict[str, Any] = {}
        self._producer: Any = None

    @classmethod
    def from_spec(cls, spec: Any) -> KafkaBroker:
        """A broker from the ``stream.broker`` settings of kind ``kafka``."""
        return cls(spec.bootstrap_servers, dict(spec.options))

    def _consumer(self, group: str) -> Any:
        if group not in self._consumers:
            conf = self.conf | {"group.id": group, "enable.auto.commit": False, "enable.partition.eof": True}
            self._consumers[group] = self._guard("connect", self.kafka.Consumer, conf)
        return self._consumers[group]

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self.kafka.KafkaException as exc:
            raise BrokerError(f"kafka: cannot {what} ({exc})") from None

    def publish(self, topic: str, messages: Iterable[tuple[str, dict[str, Any]]]) -> int:
        """Produce the messages to partition 0 and wait for every delivery; returns the new end offset."""
        if self._producer is None:
            self._producer = self._guard(
                "connect", self.kafka.Producer, self.conf | {"enable.idempotence": True}
            )
        errors: list[str] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(str(err))

        for key, payload in messages:
            value = json.dumps(payload, separators=(",", ":")).encode()
            self._guard(
                f"publish to {topic!r}",
                self._producer.produce,
                topic,
                value=value,
                key=str(key).encode(),
                partition=PARTITION,
                on_delivery=delivered,
            )
        self._producer.flush()
        if errors:
            raise BrokerError(f"kafka: cannot publish to {topic!r} ({errors[0]})")
        return self.end_offset(topic)

    def end_offset(self, topic: str) -> int:
        """The high watermark of the topic's partition 0."""
        tp = self.kafka.TopicPartition(topic, PARTITION)
        _low, high = self._guard("read the end offset", self._consumer("_meta").get_watermark_offsets, tp)
        return int(high)

    def committed(self, topic: str, group: str) -> int:
        """The group's committed offset on partition 0 (0 if it never committed)."""
        tp = self.kafka.TopicPartition(topic, PARTITION)
        (got,) = self._guard("read an offset", self._consumer(group).committed, [tp])
        return max(int(got.offset), 0)  # OFFSET_INVALID (-1001): never committed

    def poll(self, topic: str, group: str, max_messages: int, start: int | None = None) -> list[Message]:
        """Up to ``max_messages`` from ``start`` (default: the committed offset), in offset order."""
        first = self.committed(topic, group) if start is None else start
        consumer = self._consumer(group)
        self._guard("assign", consumer.assign, [self.kafka.TopicPartition(topic, PARTITION, first)])
        raw = self._guard(f"read {topic!r}", consumer.consume, num_messages=max_messages, timeout=1.0)
        out: list[Message] = []
        for m in raw:
            err = m.error()
            if err is not None:
                if err.code() == self.kafka.KafkaError._PARTITION_EOF:
                    break
                raise BrokerError(f"kafka: cannot read {topic!r} ({err})")
            out.append(Message(int(m.offset()), (m.key() or b"").decode(), json.loads(m.value())))
        if [m.offset for m in out] != list(range(first, first + len(out))):
            raise BrokerError(
                f"kafka: {topic!r} delivered offsets {[m.offset for m in out[:3]]}.. after {first}"
            )
        return out

    def commit(self, topic: str, group: str, offset: int) -> None:
        """Commit ``offset`` synchronously for the group; moving it backwards is refused."""
        current = self.committed(topic, group)
        if offset < current:
            raise BrokerError(f"{topic!r}/{group!r}: commit {offset} is behind the committed {current}")
        tp = self.kafka.TopicPartition(topic, PARTITION, offset)
        self._guard(
            f"commit {topic!r}/{group!r}", self._consumer(group).commit, offsets=[tp], asynchronous=False
        )

    def close(self) -> None:
        """Close the consumers (leaving their groups)."""
        for c in self._consumers.values():
            c.close()
        self._consumers.clear()
