"""The real broker: a 10,000-message round trip in a consumer group, the local broker's behaviour, and topics."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, ConfigSource

from worker.kafka import answers, create_topics
from worker.tools.localbroker import CACHE, BrokerError, LocalBroker
from worker.tools.localservice import free_ports

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parent.parent


def _broker_in(home: Path) -> LocalBroker:
    """A local broker in `home` on two ports that are free now."""
    port, controller = free_ports(2)
    return LocalBroker(port=port, controller_port=controller, home=home, heap="384m")


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run `fraud-worker ARGS` in a child process (env: the FRAUD_* settings to give it)."""
    child_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "worker", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=child_env)


@pytest.fixture(scope="module")
def other_checkout_broker(tmp_path_factory) -> LocalBroker:
    """A running local broker whose home is outside this checkout, as another checkout's broker would be."""
    broker = _broker_in(tmp_path_factory.mktemp("other-checkout") / "var" / "broker")
    try:
        broker.start()
    except BrokerError as exc:
        pytest.fail(f"{exc}. These tests need the project's local broker: install Java 17+ and Maven.", pytrace=False)
    yield broker
    broker.stop()


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


def test_start_is_a_no_op_when_running(session_broker, kafka_bootstrap):
    """Starting the test session's local broker again returns at once with the same address."""
    broker = LocalBroker(port=session_broker.port, controller_port=session_broker.controller_port,
                         home=session_broker.home)
    pid = broker.pid()
    assert broker.start(timeout=5) == kafka_bootstrap
    assert broker.pid() == pid is not None
    assert not broker.launched


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


def test_broker_home_is_per_checkout(tmp_path):
    """A broker's pid file, data and log live in this checkout's var/broker-PORT, which `broker status` reports."""
    port = free_ports(1)[0]
    broker = LocalBroker(port=port)
    home = ROOT / "var" / f"broker-{port}"
    assert broker.home == home and broker.log_file.parent == home
    assert not broker.home.is_relative_to(CACHE.resolve())
    done = _cli("broker", "status", "--port", str(port), cwd=tmp_path)  # from elsewhere: still this checkout's home
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"running": False, "pid": None, "bootstrap": f"127.0.0.1:{port}",
                                       "home": str(home)}


def test_stop_does_not_stop_a_broker_it_did_not_start(other_checkout_broker, tmp_path):
    """Stopping one home's broker, or a home handed the other broker's pid, leaves the other broker answering."""
    theirs, ours = other_checkout_broker, _broker_in(tmp_path / "ours")
    their_pid = theirs.pid()
    try:
        ours.start()
        our_pid = ours.pid()
        assert our_pid is not None and their_pid is not None and our_pid != their_pid
        # A pid file copied from elsewhere (or left by a process whose pid was reused) does not make a home own it.
        forged = LocalBroker(port=theirs.port, controller_port=theirs.controller_port, home=tmp_path / "forged")
        forged.home.mkdir()
        (forged.home / "broker.pid").write_text(str(their_pid))
        assert forged.pid() is None and not forged.running()
        assert forged.stop() is None
        assert ours.stop() == our_pid
        assert not answers(ours.bootstrap)
        assert answers(theirs.bootstrap, timeout=5) and theirs.pid() == their_pid
    finally:
        ours.stop()


def test_start_on_another_checkouts_port_fails_and_leaves_it_alone(other_checkout_broker):
    """`broker start` on another checkout's port fails with the one-line taken-port error, and `stop` skips it."""
    theirs = other_checkout_broker
    their_pid, home = theirs.pid(), ROOT / "var" / f"broker-{theirs.port}"
    assert not home.exists()
    try:
        with pytest.raises(BrokerError) as info:
            LocalBroker(port=theirs.port, controller_port=free_ports(1)[0]).start(timeout=5)
        assert f"port {theirs.port}" in str(info.value) and "\n" not in str(info.value)
        start = _cli("broker", "start", "--port", str(theirs.port))
        assert start.returncode == 2
        assert start.stderr.strip().splitlines() == [f"fraud-worker: {info.value}"]
        stop = _cli("broker", "stop", "--port", str(theirs.port))
        assert stop.returncode == 0, stop.stderr
        out = json.loads(stop.stdout)
        assert out["stopped"] is False and out["pid"] is None and "did not start" in out["note"]
        status = json.loads(_cli("broker", "status", "--port", str(theirs.port)).stdout)
        assert status["running"] is False and status["pid"] is None
        assert answers(theirs.bootstrap, timeout=5) and theirs.pid() == their_pid
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _broker_default_replication(client: AdminClient) -> int:
    broker = next(iter(client.list_topics(timeout=10).brokers))
    resource = ConfigResource(ConfigResource.Type.BROKER, str(broker))
    return int(client.describe_configs([resource])[resource].result(10)["default.replication.factor"].value)


def _min_insync(client: AdminClient, topic: str) -> tuple[str, ConfigSource]:
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    entry = client.describe_configs([resource])[resource].result(10)["min.insync.replicas"]
    return entry.value, ConfigSource(entry.source)


def test_topics_replication_factor_and_min_insync_replicas(settings_for, kafka_bootstrap, unique):
    """`topics` uses the broker's default replication factor unless told, and sets min.insync.replicas per topic."""
    s = settings_for(create=False)
    client = AdminClient({"bootstrap.servers": kafka_bootstrap})
    default_rf = _broker_default_replication(client)
    done = _cli("topics", "--partitions", "2", "--output-partitions", "1", "--min-insync-replicas", "1",
                env=s.to_env())
    assert done.returncode == 0, done.stderr
    topics = [s.input_topic, s.verdict_topic, s.dead_letter_topic]
    assert sorted(json.loads(done.stdout)["created"]) == sorted(topics)
    metadata = client.list_topics(timeout=10)
    for topic in topics:
        assert {len(p.replicas) for p in metadata.topics[topic].partitions.values()} == {default_rf}
        assert _min_insync(client, topic) == ("1", ConfigSource.DYNAMIC_TOPIC_CONFIG)
    assert len(metadata.topics[s.input_topic].partitions) == 2
    # An explicit replication factor, and no min.insync.replicas: the topic keeps the broker's setting.
    explicit, plain = f"rf1-{unique}", f"plain-{unique}"
    assert create_topics({"bootstrap.servers": kafka_bootstrap}, {explicit: 1}, replication=1,
                         min_insync_replicas=1) == [explicit]
    assert create_topics({"bootstrap.servers": kafka_bootstrap}, {plain: 1}, replication=-1) == [plain]
    metadata = client.list_topics(timeout=10)
    assert len(metadata.topics[explicit].partitions[0].replicas) == 1
    assert _min_insync(client, explicit) == ("1", ConfigSource.DYNAMIC_TOPIC_CONFIG)
    assert _min_insync(client, plain)[1] != ConfigSource.DYNAMIC_TOPIC_CONFIG


def test_topics_refuses_impossible_replication_in_one_line(settings_for, kafka_bootstrap):
    """Replication settings that cannot work stop `topics` with exit 2 and one line, creating nothing."""
    s = settings_for(create=False)
    default_rf = _broker_default_replication(AdminClient({"bootstrap.servers": kafka_bootstrap}))
    cases = {
        ("--replication-factor", "0"): "replication factor must be -1",
        ("--min-insync-replicas", "0"): "min.insync.replicas must be at least 1",
        ("--replication-factor", "1", "--min-insync-replicas", "2"): "exceeds the replication factor 1",
        ("--min-insync-replicas", str(default_rf + 1)): f"exceeds the replication factor {default_rf} (the broker's",
        ("--replication-factor", "99"): "cannot create topics",
    }
    for args, says in cases.items():
        done = _cli("topics", *args, env=s.to_env())
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and says in lines[0], (args, done.stderr)
    existing = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics
    assert not {s.input_topic, s.verdict_topic, s.dead_letter_topic} & set(existing)
    help_text = " ".join(_cli("topics", "--help").stdout.split())
    assert "--replication-factor" in help_text and "1 only makes sense for a local single broker" in help_text


def test_cluster_id_never_starts_with_a_dash(monkeypatch):
    """kafka-storage reads a cluster id starting with "-" as an option; such ids (1 in 64) are drawn again."""
    import uuid

    from worker.tools import localbroker

    dashed, plain = uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=bytes(16))
    draws = iter([dashed, dashed, plain])
    monkeypatch.setattr(localbroker.uuid, "uuid4", lambda: next(draws))
    assert localbroker._cluster_id() == "AAAAAAAAAAAAAAAAAAAAAA"
    assert next(draws, None) is None
