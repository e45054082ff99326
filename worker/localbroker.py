"""A local single-node Apache Kafka (KRaft) broker with no Docker: jars from Maven Central, run with Java.

The jars are cached once per machine (FRAUD_CACHE_DIR); a broker's home (pid file, data, log) belongs to one
checkout (`<checkout>/var/broker-<port>`), so checkouts never adopt or stop each other's brokers.
"""

from __future__ import annotations

import base64
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .kafka import answers

KAFKA_VERSION = os.environ.get("FRAUD_KAFKA_VERSION", "4.1.1")
LOG4J_VERSION = "2.24.3"
CACHE = Path(os.environ.get("FRAUD_CACHE_DIR", Path.home() / ".cache" / "fraud-worker"))
_PACKAGE_PARENT = Path(__file__).resolve().parent.parent

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


def checkout_dir() -> Path:
    """The checkout this package runs from (the current directory if it is installed elsewhere)."""
    return _PACKAGE_PARENT if (_PACKAGE_PARENT / "pyproject.toml").exists() else Path.cwd().resolve()


def broker_home(port: int, name: str = "broker") -> Path:
    """This checkout's home for the broker on `port`: `<checkout>/var/<name>-<port>`."""
    return checkout_dir() / "var" / f"{name}-{port}"


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct ports that are free on 127.0.0.1 right now (the OS picks them)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class LocalBroker:
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

    def __post_init__(self) -> None:
        self.home = Path(self.home).resolve() if self.home is not None else broker_home(self.port)
        self.controller_port = self.controller_port or self.port + 1
        self.launched = False  # whether this object started the process (rather than finding it running)

    @property
    def bootstrap(self) -> str:
        """The PLAINTEXT bootstrap address."""
        return f"127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        """Where the broker's output goes."""
        return self.home / "broker.log"

    @property
    def _pid_file(self) -> Path:
        return self.home / "broker.pid"

    @property
    def _config(self) -> Path:
        return self.home / "server.properties"

    def start(self, timeout: float = 90.0) -> str:
        """Start the broker unless it already runs; wait until it answers metadata; return the bootstrap."""
        self.home.mkdir(parents=True, exist_ok=True)
        # Two test sessions may start the same broker at once; the lock makes the second one find it running.
        with open(self.home / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._start(timeout)

    def _start(self, timeout: float) -> str:
        if self.running():
            try:
                config = self._config.read_text()
            except OSError:
                config = ""
            if f"PLAINTEXT://127.0.0.1:{self.port}," not in config:
                raise BrokerError(f"the broker of {self.home} runs on another port; stop it first")
            if answers(self.bootstrap):
                return self.bootstrap
            self._wait_ready(timeout)
            return self.bootstrap
        for port in (self.port, self.controller_port, self.sasl_port):
            if port and not _port_free(port):
                raise BrokerError(f"port {port} on 127.0.0.1 is taken by another process; choose another with --port")
        java = _require("java", "install a Java 17+ runtime (e.g. apt-get install openjdk-17-jre-headless)")
        libs = fetch_jars()
        self.home.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        if not (self.home / "data" / "meta.properties").exists():
            self._format(java, libs, config)
        with open(self.log_file, "ab") as out:
            proc = subprocess.Popen(
                [java, f"-Xmx{self.heap}", "-Xms256m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
                 f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
                 "-cp", f"{libs}/*", "kafka.Kafka", str(config)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self._pid_file.write_text(str(proc.pid))
        self.launched = True
        self._wait_ready(timeout, proc)
        return self.bootstrap

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop this home's broker: SIGTERM, then SIGKILL after `timeout`; return its pid, None if none ran.

        Only the process in this home's pid file is signalled, and only if it really is this home's broker, so a
        broker of another checkout (or a process that reused a stale pid) is never touched.
        """
        pid = self.pid()
        if pid is None:
            self._pid_file.unlink(missing_ok=True)  # stale: the process is gone or is not this home's broker
            return None
        _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.1)
        self._pid_file.unlink(missing_ok=True)
        return pid

    def kill(self) -> None:
        """SIGKILL the broker (for fault injection)."""
        self.stop(timeout=0)

    def pid(self) -> int | None:
        """The pid of this home's broker if it runs; a live pid whose command line is not this broker's is not it."""
        try:
            pid = int(self._pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) and _runs_config(pid, self._config) else None

    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self.pid() is not None

    def _wait_ready(self, timeout: float, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise BrokerError(f"Kafka exited with code {proc.returncode} during start-up; see {self.log_file}")
            if answers(self.bootstrap):
                return
            time.sleep(0.3)
        raise BrokerError(f"Kafka did not answer on {self.bootstrap} within {timeout:.0f}s; see {self.log_file}")

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
    mvn = _require("mvn", "install Apache Maven (e.g. apt-get install maven) so the Kafka jars can be fetched")
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
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _require(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise BrokerError(f"{tool} not found on PATH: {hint}")
    return path


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state != "Z"
    except OSError:
        return True


def _runs_config(pid: int, config: Path) -> bool:
    """Whether process `pid` is a Kafka broker started with `config` (its command line names it)."""
    if Path("/proc/self/cmdline").exists():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return os.fsencode(str(config)) in args
    done = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True, text=True)
    return f" {config}" in done.stdout


def _signal(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)
