"""Shared fixtures: one real Kafka broker per session, fresh topics and groups per test."""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest

from worker.kafka import create_topics
from worker.settings import Settings
from worker.tools.localbroker import KAFKA_VERSION, LocalBroker, broker_home
from worker.tools.localregistry import LocalRegistry
from worker.tools.localregistry import answers as registry_answers
from worker.tools.localservice import LocalProcess, checkout_dir, free_ports

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT.parent / "shared" / "reference-model"
# Unset (the default), the session's local broker listens on ports free at run time; set, on this port.
TEST_BROKER_PORT = int(os.environ["FRAUD_TEST_BROKER_PORT"]) if os.environ.get("FRAUD_TEST_BROKER_PORT") else None
# Homes of local brokers on ports chosen at run time; each holds the lock of the session that owns it.
RUN_BROKERS = checkout_dir() / "var" / "test-brokers"
HOW_TO_GET_A_BROKER = (
    "No Kafka broker for the tests. Set KAFKA_BOOTSTRAP_SERVERS to a reachable broker, or start Docker so "
    "testcontainers can run one, or install Java 17+ and Maven so the tests start the project's own broker "
    "(`fraud-worker broker start --port {port}` shows whether it can run)."
)
# Homes of local Schema Registries on ports chosen at run time; each holds the lock of the session that owns it.
RUN_REGISTRIES = checkout_dir() / "var" / "test-registries"
HOW_TO_GET_A_REGISTRY = (
    "No Schema Registry for the tests. Set SCHEMA_REGISTRY_URL to a reachable one (Confluent API), or start Docker "
    "so testcontainers can run Apicurio, or install Java 17 and Maven so the tests start the project's own registry "
    "(`fraud-worker registry start --port 8081` shows whether it can run)."
)
_SESSION: dict[str, LocalBroker] = {}


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

        with KafkaContainer(f"apache/kafka:{KAFKA_VERSION}").with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    if TEST_BROKER_PORT:
        broker, owner = LocalBroker(port=TEST_BROKER_PORT, home=broker_home(TEST_BROKER_PORT, "broker-test")), None
    else:
        broker, owner = _claim_run_home(LocalBroker, RUN_BROKERS, "port", "controller_port")
    with _serve_session(broker, owner, HOW_TO_GET_A_BROKER.format(port=TEST_BROKER_PORT or 9092)) as bootstrap:
        _SESSION["broker"] = broker
        yield bootstrap
    _SESSION.pop("broker", None)


def _claim_run_home(cls: type[LocalProcess], runs: Path, *port_fields: str) -> tuple[LocalProcess, IO]:
    """A `cls` on free ports (`port_fields`), its home under `runs` locked by this session; reaps dead sessions' first."""
    runs.mkdir(parents=True, exist_ok=True)
    with open(runs / ".lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        for home in runs.iterdir():
            if not (home.is_dir() and home.name.isdigit()):
                continue
            with open(home / "session.lock", "a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live session owns it
                cls(port=int(home.name), home=home).stop(timeout=10)  # its session died before teardown
                shutil.rmtree(home, ignore_errors=True)
        while True:
            ports = dict(zip(port_fields, free_ports(len(port_fields))))
            home = runs / str(ports["port"])
            if not home.exists():
                break
        home.mkdir()
        owner = open(home / "session.lock", "w")
        fcntl.flock(owner, fcntl.LOCK_EX)  # held until this session ends, however it ends
    return cls(**ports, home=home), owner


@contextmanager
def _serve_session(process: LocalProcess, owner: IO | None, how_to_get_one: str) -> Iterator[str]:
    """Start `process` and yield its address; then stop it if this session started it, and free its run home."""
    started = False
    try:
        try:
            address = process.start()
        except process.error as exc:
            pytest.fail(f"{exc}. {how_to_get_one}", pytrace=False)
        started = True
        yield address
    finally:
        if process.launched:  # one that was already running (FRAUD_TEST_BROKER_PORT) is not this session's
            process.stop()
        if owner is not None:
            if started:  # after a failed start the home keeps the process's log; the next session removes it
                shutil.rmtree(process.home, ignore_errors=True)
            owner.close()


@pytest.fixture(scope="session")
def session_broker(kafka_bootstrap) -> LocalBroker:
    """The project's local broker that serves this session; fails if KAFKA_BOOTSTRAP_SERVERS or Docker serves it."""
    if "broker" not in _SESSION:
        pytest.fail("this test checks the project's local broker; unset KAFKA_BOOTSTRAP_SERVERS and stop Docker "
                    "to run it", pytrace=False)
    return _SESSION["broker"]


@pytest.fixture(scope="session")
def schema_registry_url() -> str:
    """A real Schema Registry: SCHEMA_REGISTRY_URL, else Apicurio in testcontainers, else the project's local one."""
    if os.environ.get("SCHEMA_REGISTRY_URL"):
        yield os.environ["SCHEMA_REGISTRY_URL"]
    elif _docker_answers():
        yield from _container_registry()
    else:
        registry, owner = _claim_run_home(LocalRegistry, RUN_REGISTRIES, "port")
        with _serve_session(registry, owner, HOW_TO_GET_A_REGISTRY) as url:
            yield url


def _container_registry():
    """Apicurio Registry 3.0.9 in a container, global compatibility BACKWARD like the local one."""
    import time

    from confluent_kafka.schema_registry import SchemaRegistryClient
    from testcontainers.core.container import DockerContainer

    with DockerContainer("apicurio/apicurio-registry:3.0.9").with_exposed_ports(8080) as container:
        url = f"http://{container.get_container_host_ip()}:{container.get_exposed_port(8080)}/apis/ccompat/v7"
        deadline = time.monotonic() + 120
        while not registry_answers(url):
            if time.monotonic() > deadline:
                pytest.fail(f"the Apicurio container did not answer on {url}. {HOW_TO_GET_A_REGISTRY}", pytrace=False)
            time.sleep(0.5)
        SchemaRegistryClient({"url": url}).set_compatibility(level="BACKWARD")
        yield url


@pytest.fixture
def registry_client(schema_registry_url):
    """A confluent-kafka SchemaRegistryClient for the session's registry."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    return SchemaRegistryClient({"url": schema_registry_url})


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
