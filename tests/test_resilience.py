"""The worker around a changing cluster: the input topic deleted and re-created, and a stop while the broker is down."""

from __future__ import annotations

import json
import time

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from tests.kafkatools import WorkerProcess, committed_offsets, end_offsets, produce_transactions, read_topic, wait_until
from tests.test_operations import _get
from worker.avro.codec import Codec
from worker.kafka import create_topics
from worker.tools import traffic
from worker.tools.localbroker import BrokerError, LocalBroker
from worker.tools.localservice import free_ports

pytestmark = pytest.mark.kafka
CODEC = Codec()


def _ready(port: int) -> tuple[int, dict]:
    status, body = _get(port, "/readyz")
    return status, json.loads(body)


def _events(w: WorkerProcess) -> list[dict]:
    return [json.loads(line) for line in w.log().splitlines() if line.startswith("{")]


def test_input_topic_deleted_and_recreated(settings_for, tmp_path):
    """While the input topic is gone /readyz says so (degraded, still ready: every replica shares the outage), one error
    line says so, and a re-created topic is committed from 0."""
    port = free_ports(1)[0]
    s = settings_for(partitions=2, metrics_port=port)
    w = WorkerProcess(s, tmp_path / "w.log")
    assert w.wait_assigned(), w.log()[-2000:]
    produce_transactions(s, traffic.generated(400, seed=21, prefix="before"))
    wait_until(lambda: committed_offsets(s) == end_offsets(s, s.input_topic), 60, "the first 400 to be committed")
    wait_until(lambda: _ready(port)[0] == 200, 30, "/readyz to turn ready")

    admin = AdminClient({"bootstrap.servers": s.bootstrap_servers})
    admin.delete_topics([s.input_topic])[s.input_topic].result()
    wait_until(lambda: _ready(port)[1]["input_topic_present"] is False, 30, "/readyz to say the input topic is missing")
    assert _ready(port)[0] == 200 and _ready(port)[1]["degraded"] is True
    time.sleep(3)  # more watch rounds: the missing topic is still said once
    assert sum(e["event"] == "input_topic_missing" and e["level"] == "error" for e in _events(w)) == 1

    admin.create_topics([NewTopic(s.input_topic, 2, 1)])[s.input_topic].result()
    produce_transactions(s, traffic.generated(60, seed=22, prefix="after"))
    wait_until(lambda: _ready(port)[1]["degraded"] is False, 30, "/readyz to say the input topic is back")
    after = [CODEC.decode_verdict(r.value)["transaction_id"] for r in read_topic(s, s.verdict_topic, 460)]
    assert sorted(t for t in after if t.startswith("after")) == sorted(t.transaction_id for t in
                                                                       traffic.generated(60, seed=22, prefix="after"))
    ends = end_offsets(s, s.input_topic)
    assert sum(ends.values()) == 60
    wait_until(lambda: committed_offsets(s) == ends, 30, "the re-created topic's offsets to be committed")
    assert w.terminate() == 0, w.log()[-3000:]
    assert any(e["event"] == "input_topic_recreated" for e in _events(w))


def test_stop_with_the_broker_down_stays_within_the_shutdown_timeout(tmp_path, settings_for):
    """SIGTERM while the broker is down and outputs are unacknowledged: the worker exits within FRAUD_SHUTDOWN_TIMEOUT_S."""
    port, controller = free_ports(2)
    broker = LocalBroker(port=port, controller_port=controller, home=tmp_path / "broker", heap="384m")
    try:
        broker.start()
    except BrokerError as exc:
        pytest.fail(f"{exc}. This test needs the project's local broker: install Java 17+ and Maven.", pytrace=False)
    try:
        s = settings_for(create=False, bootstrap_servers=broker.bootstrap, shutdown_timeout_s=6.0)
        create_topics({"bootstrap.servers": broker.bootstrap}, {s.input_topic: 2, s.verdict_topic: 2,
                                                                s.dead_letter_topic: 2})
        w = WorkerProcess(s, tmp_path / "w.log")
        assert w.wait_assigned(), w.log()[-2000:]
        produce_transactions(s, traffic.generated(20_000, seed=23, prefix="down"))
        wait_until(lambda: '"progress"' in w.log(), 60, "a first batch")
        broker.kill()
        time.sleep(3)
        started = time.monotonic()
        code = w.terminate(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        broker.stop()
    assert code == 0, w.log()[-3000:]
    # The timeout bounds the drain, the revoke and the final commit together; the margin is process teardown.
    assert elapsed < s.shutdown_timeout_s + 4, f"stop took {elapsed:.1f}s; {w.log()[-3000:]}"
