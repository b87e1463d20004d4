"""The Kafka broker adapter's offset/commit mapping, against an IN-PROCESS FAKE of the confluent_kafka
Consumer/Producer API (no Kafka cluster can run here; nothing in this file talks to a live Kafka).

The fake keeps per-topic logs and per-group committed offsets in memory and mimics the client's
calls the adapter uses: assign at an offset, bounded consume with a partition-EOF event,
synchronous commit of "the next offset needed", committed() returning OFFSET_INVALID (-1001)
for a group that never committed, and watermarks.
"""

from __future__ import annotations

import builtins
import sys
from types import SimpleNamespace

import pytest

from adapters.broker import BrokerError
from adapters.broker_kafka import KafkaBroker

OFFSET_INVALID = -1001


class _FakeKafka:
    """Just enough of ``confluent_kafka`` for the adapter (see module doc): a fake, for Kafka only."""

    class KafkaException(Exception):
        pass

    class KafkaError:
        _PARTITION_EOF = -191

        def __init__(self, code: int):
            self._code = code

        def code(self) -> int:
            return self._code

    class TopicPartition:
        def __init__(self, topic: str, partition: int, offset: int = OFFSET_INVALID):
            self.topic, self.partition, self.offset = topic, partition, offset

    def __init__(self) -> None:
        self.logs: dict[str, list[tuple[bytes, bytes]]] = {}
        self.commits: dict[tuple[str, str], int] = {}
        self.consumed_counts: list[int] = []
        fake = self

        class _Msg:
            def __init__(self, offset: int | None, key: bytes | None, value: bytes | None, err=None):
                self._o, self._k, self._v, self._e = offset, key, value, err

            def error(self):
                return self._e

            def offset(self):
                return self._o

            def key(self):
                return self._k

            def value(self):
                return self._v

        class Consumer:
            def __init__(self, conf: dict):
                assert conf["enable.auto.commit"] is False
                self.group, self.pos = conf["group.id"], None

            def assign(self, tps):
                (tp,) = tps
                self.pos = (tp.topic, tp.offset)

            def consume(self, num_messages: int, timeout: float):
                topic, at = self.pos
                log = fake.logs.get(topic, [])
                out = [_Msg(i, *log[i]) for i in range(at, min(at + num_messages, len(log)))]
                fake.consumed_counts.append(len(out))
                if len(out) < num_messages:
                    out.append(_Msg(None, None, None, fake.KafkaError(fake.KafkaError._PARTITION_EOF)))
                self.pos = (topic, at + len(out))
                return out

            def committed(self, tps):
                (tp,) = tps
                return [
                    fake.TopicPartition(tp.topic, 0, fake.commits.get((tp.topic, self.group), OFFSET_INVALID))
                ]

            def commit(self, offsets, asynchronous: bool):
                assert asynchronous is False
                for tp in offsets:
                    fake.commits[(tp.topic, self.group)] = tp.offset

            def get_watermark_offsets(self, tp):
                return 0, len(fake.logs.get(tp.topic, []))

            def close(self):
                pass

        class Producer:
            def __init__(self, conf: dict):
                self.conf = conf

            def produce(self, topic, value, key, partition, on_delivery):
                fake.logs.setdefault(topic, []).append((key, value))
                on_delivery(None, None)

            def flush(self):
                return 0

        self.Consumer, self.Producer = Consumer, Producer


def test_kafka_mapping_offsets_commits_and_bounded_reads_against_a_fake_client() -> None:
    """(Fake client.) Published messages get Kafka offsets 0..; a group never committed starts at 0
    (OFFSET_INVALID maps to 0); poll reads at most the batch from the asked offset; commit stores
    the next offset needed, synchronously; a commit backwards is refused."""
    fake = _FakeKafka()
    broker = KafkaBroker("kafka:9092", client=fake)
    assert broker.publish("t", [(f"k{i}", {"i": i}) for i in range(10)]) == 10
    assert broker.committed("t", "g") == 0
    got = broker.poll("t", "g", 4)
    assert [(m.offset, m.key, m.payload["i"]) for m in got] == [(i, f"k{i}", i) for i in range(4)]
    assert fake.consumed_counts[-1] == 4
    broker.commit("t", "g", 4)
    assert fake.commits[("t", "g")] == 4 and broker.committed("t", "g") == 4
    assert [m.offset for m in broker.poll("t", "g", 100)] == list(range(4, 10))
    assert [m.offset for m in broker.poll("t", "g", 2, start=1)] == [1, 2]
    assert broker.end_offset("t") == 10
    with pytest.raises(BrokerError, match="behind the committed 4"):
        broker.commit("t", "g", 3)


def test_kafka_without_the_client_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without confluent-kafka installed, configuring the Kafka broker is one BrokerError line."""
    real_import = builtins.__import__

    def no_kafka(name, *args, **kwargs):
        if name == "confluent_kafka":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "confluent_kafka", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_kafka)
    with pytest.raises(BrokerError, match="needs the confluent-kafka client"):
        KafkaBroker.from_spec(SimpleNamespace(bootstrap_servers="k:9092", options={}))


def test_the_stream_config_selects_the_kafka_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    """`stream.broker: {kind: kafka, ...}` makes the flow use the Kafka adapter with its options."""
    from flows.stream import broker_for
    from mlops.settings import load_settings

    fake = _FakeKafka()
    monkeypatch.setitem(sys.modules, "confluent_kafka", fake)
    env = {"MLOPS__STREAM__BROKER": "{kind: kafka, bootstrap_servers: 'k1:9092', options: {acks: all}}"}
    broker = broker_for(load_settings(environ=env))
    assert isinstance(broker, KafkaBroker) and broker.conf == {"bootstrap.servers": "k1:9092", "acks": "all"}
