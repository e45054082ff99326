"""A local single-node Apache Kafka (KRaft) broker with no Docker: jars from Maven Central, run with Java.

The jars are cached once per machine (FRAUD_CACHE_DIR); a broker's home (pid file, data, log) belongs to one
checkout (`<checkout>/var/broker-<port>`), so checkouts never adopt or stop each other's brokers.
"""

from __future__ import annotations

import base64
import os
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..kafka import answers
from .localservice import CACHE, LocalProcess, local_home, require

KAFKA_VERSION = os.environ.get("FRAUD_KAFKA_VERSION", "4.4.0")
LOG4J_VERSION = "2.24.3"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.fraudworker</groupId><artifactId>kafka-broker</artifactId><version>1</version><packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{kafka}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>{log4j}</version></dependency>
  </dependencies>
</project>
"""
_LOG4J = """rootLogger.level=INFO
rootLogger.appenderRef.out.ref=OUT
appender.out.type=Console
appender.out.name=OUT
appender.out.layout.type=PatternLayout
appender.out.layout.pattern=[%d] %p %m (%c)%n
logger.kafka.name=kafka
logger.kafka.level=WARN
logger.apache.name=org.apache.kafka
logger.apache.level=WARN
"""


class BrokerError(RuntimeError):
    """The local broker cannot be fetched, started or stopped."""


def broker_home(port: int, name: str = "broker") -> Path:
    """This checkout's home for the broker on `port`: `<checkout>/var/<name>-<port>`."""
    return local_home(port, name)


@dataclass
class LocalBroker(LocalProcess):
    """A single-node KRaft broker bound to 127.0.0.1, with its pid file, data and log under `home`.

    `home` defaults to this checkout's `var/broker-<port>`. The broker is only ever adopted, reported or stopped
    through the pid file in `home`, and only while that pid's command line names this home's config.
    """

    port: int = 9092
    controller_port: int | None = None
    home: Path | None = None
    scram_users: dict[str, str] = field(default_factory=dict)
    sasl_port: int | None = None
    acls: bool = False
    heap: str = "768m"

    kind = "broker"
    title = "Kafka"
    error = BrokerError
    address_name = "bootstrap"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.controller_port = self.controller_port or self.port + 1

    @property
    def bootstrap(self) -> str:
        """The PLAINTEXT bootstrap address."""
        return f"127.0.0.1:{self.port}"

    address = bootstrap

    @property
    def _config(self) -> Path:
        return self.home / "server.properties"

    def answering(self, timeout: float = 1.0) -> bool:
        """Whether a broker answers metadata requests on this port, whoever started it."""
        return answers(self.bootstrap, timeout)

    def kill(self) -> None:
        """SIGKILL the broker (for fault injection)."""
        self.stop(timeout=0)

    def _ports(self) -> tuple[int | None, ...]:
        return self.port, self.controller_port, self.sasl_port

    def _home_arg(self) -> str:
        return str(self._config)

    def _runs_on_port(self, pid: int) -> bool:
        try:
            return f"PLAINTEXT://127.0.0.1:{self.port}," in self._config.read_text()
        except OSError:
            return False

    def _command(self, java: str) -> list[str]:
        libs = fetch_jars()
        config = self._write_config()
        if not (self.home / "data" / "meta.properties").exists():
            self._format(java, libs, config)
        return [java, f"-Xmx{self.heap}", "-Xms256m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
                "-cp", f"{libs}/*", "kafka.Kafka", str(config)]

    def _write_config(self) -> Path:
        listeners = [f"PLAINTEXT://127.0.0.1:{self.port}", f"CONTROLLER://127.0.0.1:{self.controller_port}"]
        protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
        advertised = [f"PLAINTEXT://127.0.0.1:{self.port}"]
        extra = []
        if self.sasl_port:
            listeners.append(f"SASL://127.0.0.1:{self.sasl_port}")
            advertised.append(f"SASL://127.0.0.1:{self.sasl_port}")
            protocols.append("SASL:SASL_PLAINTEXT")
            extra += [
                "sasl.enabled.mechanisms=SCRAM-SHA-512",
                "listener.name.sasl.scram-sha-512.sasl.jaas.config="
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            ]
        if self.acls:
            # Everyone may do everything until an ACL says otherwise; the chaos harness adds DENY ACLs as faults.
            extra += ["authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                      "allow.everyone.if.no.acl.found=true"]
        lines = [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
            f"listeners={','.join(listeners)}",
            f"advertised.listeners={','.join(advertised)}",
            f"listener.security.protocol.map={','.join(protocols)}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            f"log.dirs={self.home / 'data'}",
            "num.partitions=1",
            "auto.create.topics.enable=false",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=10",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "group.min.session.timeout.ms=1000",
            # The consumer group protocol (KIP-848) keeps sessions broker side: 10 s, as the worker's classic default.
            "group.consumer.min.session.timeout.ms=1000",
            "group.consumer.session.timeout.ms=10000",
            "group.consumer.min.heartbeat.interval.ms=500",
            "group.consumer.heartbeat.interval.ms=1000",
            # A transaction left open by a dead producer holds back read_committed readers until it is aborted:
            # look for expired ones every second (Kafka's default: every 10 s after transaction.timeout.ms).
            "transaction.abort.timed.out.transaction.cleanup.interval.ms=1000",
            "log.retention.hours=24",
            *extra,
        ]
        config = self._config
        config.write_text("\n".join(lines) + "\n")
        (self.home / "log4j2.properties").write_text(_LOG4J)
        return config

    def _format(self, java: str, libs: Path, config: Path) -> None:
        cmd = [java, f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}", "-cp", f"{libs}/*",
               "kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(config), "--ignore-formatted"]
        for user, password in self.scram_users.items():
            cmd += ["--add-scram", f"SCRAM-SHA-512=[name={user},password={password}]"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise BrokerError(f"formatting Kafka storage failed: {tail[0]}")


def fetch_jars(version: str = KAFKA_VERSION) -> Path:
    """Download the broker's jars from Maven Central once into the cache; return their directory."""
    target = CACHE / f"kafka-{version}"
    libs = target / "libs"
    if (target / ".complete").exists():
        return libs
    mvn = require("mvn", "install Apache Maven (e.g. apt-get install maven) so the Kafka jars can be fetched",
                  BrokerError)
    target.mkdir(parents=True, exist_ok=True)
    (target / "pom.xml").write_text(_POM.format(kafka=version, log4j=LOG4J_VERSION))
    done = subprocess.run(
        [mvn, "-q", "-B", "-f", str(target / "pom.xml"), "dependency:copy-dependencies",
         "-DincludeScope=runtime", f"-DoutputDirectory={libs}"],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        lines = [ln for ln in (done.stdout + done.stderr).splitlines() if "ERROR" in ln] or ["no output"]
        raise BrokerError(f"fetching Kafka {version} from Maven Central failed: {lines[0].strip()[:300]}")
    (target / ".complete").write_text(version)
    return libs


def _cluster_id() -> str:
    """A random cluster id; never one starting with "-", which kafka-storage would read as an option (1 in 64)."""
    while (cid := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")).startswith("-"):
        pass
    return cid
