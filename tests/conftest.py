"""Shared fixtures: one real Kafka broker per session, fresh topics and groups per test."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from worker.kafka import create_topics
from worker.localbroker import CACHE, BrokerError, LocalBroker
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT.parent / "shared" / "reference-model"
TEST_BROKER_PORT = int(os.environ.get("FRAUD_TEST_BROKER_PORT", "39092"))
HOW_TO_GET_A_BROKER = (
    "No Kafka broker for the tests. Set KAFKA_BOOTSTRAP_SERVERS to a reachable broker, or start Docker so "
    "testcontainers can run one, or install Java 17+ and Maven so the project starts its own "
    "(`fraud-worker broker start --port {port}`)."
)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the long chaos and benchmark runs")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    # Long runs are deselected, not skipped: their bounded versions are separate tests that always run.
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """A real broker: KAFKA_BOOTSTRAP_SERVERS, else testcontainers with Docker, else the project's local broker."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("apache/kafka:4.1.1").with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    broker = LocalBroker(port=TEST_BROKER_PORT, home=CACHE / f"broker-test-{TEST_BROKER_PORT}")
    try:
        yield broker.start()
    except BrokerError as exc:
        pytest.fail(f"{exc}. {HOW_TO_GET_A_BROKER.format(port=TEST_BROKER_PORT)}", pytrace=False)


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic and group names."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def settings_for(kafka_bootstrap, unique, tmp_path):
    """Build Settings on fresh topics and a fresh group; creates the topics."""

    def make(partitions: int = 6, create: bool = True, **overrides) -> Settings:
        defaults = dict(
            bootstrap_servers=kafka_bootstrap,
            group_id=f"g-{unique}",
            input_topic=f"tx-{unique}",
            verdict_topic=f"verdicts-{unique}",
            dead_letter_topic=f"dlq-{unique}",
            worker_id=f"test-{unique}",
            metrics_port=0,
            consumer_config={"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"},
        )
        s = Settings(**(defaults | overrides))
        if create:
            create_topics({"bootstrap.servers": kafka_bootstrap},
                          {s.input_topic: partitions, s.verdict_topic: partitions, s.dead_letter_topic: partitions})
        return s

    return make
