"""The real broker: a 10,000-message round trip in a consumer group, and the local broker's behaviour."""

from __future__ import annotations

import socket

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from worker.kafka import create_topics
from worker.localbroker import BrokerError, LocalBroker

pytestmark = pytest.mark.kafka


def test_round_trip_commits_every_offset(kafka_bootstrap, unique):
    """10,000 messages over 6 partitions are all consumed in a group, and committed offsets equal end offsets."""
    topic, n = f"roundtrip-{unique}", 10_000
    create_topics({"bootstrap.servers": kafka_bootstrap}, {topic: 6})
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for i in range(n):
        producer.produce(topic, f"v{i}".encode(), f"k{i % 97}".encode())
        producer.poll(0)
    assert producer.flush(30) == 0

    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"g-{unique}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    seen = set()
    for _ in range(300):
        for msg in consumer.consume(1000, 0.2):
            assert msg.error() is None
            seen.add(msg.value())
        if len(seen) == n:
            break
    consumer.commit(asynchronous=False)
    parts = [TopicPartition(topic, p) for p in range(6)]
    committed = {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=10)}
    ends = {p.partition: consumer.get_watermark_offsets(p, timeout=10)[1] for p in parts}
    consumer.close()
    assert len(seen) == n
    assert committed == ends
    assert sum(ends.values()) == n


def test_start_is_a_no_op_when_running(kafka_bootstrap):
    """Starting the test session's local broker again returns at once with the same address."""
    if not kafka_bootstrap.startswith("127.0.0.1:"):
        pytest.fail("this test checks the project's local broker; unset KAFKA_BOOTSTRAP_SERVERS to run it")
    port = int(kafka_bootstrap.rsplit(":", 1)[1])
    from tests.conftest import TEST_BROKER_PORT
    from worker.localbroker import CACHE

    broker = LocalBroker(port=port, home=CACHE / f"broker-test-{TEST_BROKER_PORT}")
    pid = broker.pid()
    assert broker.start(timeout=5) == kafka_bootstrap
    assert broker.pid() == pid is not None


def test_taken_port_is_one_clear_error(tmp_path):
    """A port held by another process stops start-up with one line that names the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(BrokerError) as info:
            LocalBroker(port=port, controller_port=port + 1, home=tmp_path / "b").start(timeout=5)
    assert f"port {port}" in str(info.value)
    assert "\n" not in str(info.value)
