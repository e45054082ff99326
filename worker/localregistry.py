"""A local Schema Registry with no Docker: Apicurio Registry from Maven Central, run with Java 17.

Apicurio serves Confluent's Schema Registry API under `/apis/ccompat/v7`, which is what the worker and
confluent-kafka's `SchemaRegistryClient` talk to; after start-up its global compatibility is set to BACKWARD,
Confluent's default. Storage is Apicurio's default in-memory H2 database, so every schema is lost when the
registry stops: it is for development and tests, and a restarted registry starts empty.

The app is fetched and extracted once per machine into the shared cache (FRAUD_CACHE_DIR); a registry's home
(pid file, log) belongs to one checkout (`<checkout>/var/registry-<port>`), so checkouts never adopt or stop
each other's registries.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .localbroker import CACHE, _alive, _port_free, _signal, broker_home

REGISTRY_VERSION = "3.0.9"  # the last Apicurio line on Java 17; 3.3.x needs Java 21
_ARTIFACT = "io.apicurio:apicurio-registry-app:{version}:tar.gz:all"
_HOME_PROPERTY = "-Dfraud.registry.home="  # names the home in the command line, so a pid is checked against it


class RegistryError(RuntimeError):
    """The local Schema Registry cannot be fetched, started or stopped."""


def registry_home(port: int, name: str = "registry") -> Path:
    """This checkout's home for the registry on `port`: `<checkout>/var/<name>-<port>`."""
    return broker_home(port, name)


def answers(url: str, timeout: float = 1.0) -> bool:
    """Whether the Confluent-compatible API at `url` (…/apis/ccompat/v7) answers `GET /subjects` with 200."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/subjects", timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, ValueError):  # URLError, HTTPError, timeouts and refused connections are OSErrors
        return False


@dataclass
class LocalRegistry:
    """An Apicurio Registry bound to 127.0.0.1 with in-memory storage, its pid file and log under `home`.

    `home` defaults to this checkout's `var/registry-<port>`. The registry is only ever adopted, reported, paused
    or stopped through the pid file in `home`, and only while that pid's command line names this home.
    """

    port: int = 8081
    home: Path | None = None
    heap: str = "384m"

    def __post_init__(self) -> None:
        self.home = Path(self.home).resolve() if self.home is not None else registry_home(self.port)
        self.launched = False  # whether this object started the process (rather than finding it running)

    @property
    def url(self) -> str:
        """The Confluent-compatible Schema Registry URL (what `schema.registry.url` should be)."""
        return f"http://127.0.0.1:{self.port}/apis/ccompat/v7"

    @property
    def log_file(self) -> Path:
        """Where the registry's output goes."""
        return self.home / "registry.log"

    @property
    def _pid_file(self) -> Path:
        return self.home / "registry.pid"

    def start(self, timeout: float = 90.0) -> str:
        """Start the registry unless it already runs from this home; wait until it answers; return its URL."""
        self.home.mkdir(parents=True, exist_ok=True)
        # Two test sessions may start the same registry at once; the lock makes the second one find it running.
        with open(self.home / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._start(timeout)

    def _start(self, timeout: float) -> str:
        pid = self.pid()
        if pid is not None:
            if f"-Dquarkus.http.port={self.port}".encode() not in _cmdline(pid).split(b"\0"):
                raise RegistryError(f"the registry of {self.home} runs on another port; stop it first")
            if not answers(self.url):
                self._wait_ready(timeout)
            return self.url
        if not _port_free(self.port):
            raise RegistryError(f"port {self.port} on 127.0.0.1 is taken by another process; choose another with --port")
        java = _require("java", "install a Java 17+ runtime (e.g. apt-get install openjdk-17-jre-headless)")
        app = fetch_registry()
        with open(self.log_file, "ab") as out:
            proc = subprocess.Popen(
                [java, f"-Xmx{self.heap}", "-Djava.awt.headless=true", f"{_HOME_PROPERTY}{self.home}",
                 f"-Dquarkus.http.port={self.port}", "-Dquarkus.http.host=127.0.0.1",
                 "-jar", str(app / _runner_jar())],
                cwd=self.home, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._pid_file.write_text(str(proc.pid))
        self.launched = True
        try:
            self._wait_ready(timeout, proc)
            self._set_backward()
        except RegistryError:
            self.stop(timeout=5)  # a half-started registry would hold the port with no way to adopt it
            raise
        return self.url

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop this home's registry: SIGTERM, then SIGKILL after `timeout`; return its pid, None if none ran.

        Only the process in this home's pid file is signalled, and only if its command line names this home, so a
        registry of another checkout (or a process that reused a stale pid) is never touched. A paused registry is
        resumed so that it can act on the SIGTERM.
        """
        pid = self.pid()
        if pid is None:
            self._pid_file.unlink(missing_ok=True)  # stale: the process is gone or is not this home's registry
            return None
        _signal(pid, signal.SIGTERM)
        _signal(pid, signal.SIGCONT)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.1)
        self._pid_file.unlink(missing_ok=True)
        return pid

    def pause(self) -> int:
        """SIGSTOP the registry (a hung registry, for fault tests): connections open but nothing answers."""
        return self._send(signal.SIGSTOP)

    def resume(self) -> int:
        """SIGCONT a paused registry."""
        return self._send(signal.SIGCONT)

    def pid(self) -> int | None:
        """The pid of this home's registry if it runs; a live pid whose command line does not name this home is not it."""
        try:
            pid = int(self._pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) and os.fsencode(f"{_HOME_PROPERTY}{self.home}") in _cmdline(pid).split(b"\0") else None

    def running(self) -> bool:
        """Whether the registry process is alive (a paused one counts)."""
        return self.pid() is not None

    def _send(self, sig: int) -> int:
        pid = self.pid()
        if pid is None:
            raise RegistryError(f"no registry of {self.home} is running")
        os.kill(pid, sig)
        return pid

    def _wait_ready(self, timeout: float, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                hint = "; it needs Java 17+" if "UnsupportedClassVersionError" in _tail(self.log_file) else ""
                raise RegistryError(f"the registry exited with code {proc.returncode} during start-up{hint}; "
                                    f"see {self.log_file}")
            if answers(self.url):
                return
            time.sleep(0.3)
        raise RegistryError(f"the registry did not answer on {self.url} within {timeout:.0f}s; see {self.log_file}")

    def _set_backward(self) -> None:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        try:
            SchemaRegistryClient({"url": self.url, "timeout": 10}).set_compatibility(level="BACKWARD")
        except Exception as exc:  # noqa: BLE001 - any failure here is one line for the caller
            raise RegistryError(f"setting the registry's global compatibility to BACKWARD failed: {exc}") from None


def fetch_registry(version: str = REGISTRY_VERSION) -> Path:
    """Fetch Apicurio Registry from Maven Central once into the cache, extracted; return the app's directory.

    The tarball is extracted into a temporary directory that is renamed into place, under a lock, so a
    concurrent or interrupted fetch never leaves a half-extracted app where one is looked for.
    """
    target = CACHE / f"apicurio-registry-{version}"
    if (target / _runner_jar(version)).exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"apicurio-registry-{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / _runner_jar(version)).exists():  # fetched by another process while this one waited
            return target
        mvn = _require("mvn", "install Apache Maven (e.g. apt-get install maven) so the registry can be fetched")
        work = CACHE / f".apicurio-registry-{version}.tmp-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        try:
            (work / "download").mkdir(parents=True)
            done = subprocess.run(
                [mvn, "-q", "-B", "dependency:copy", f"-Dartifact={_ARTIFACT.format(version=version)}",
                 f"-DoutputDirectory={work / 'download'}"],
                cwd=work, capture_output=True, text=True,
            )
            tarballs = list((work / "download").glob("*.tar.gz"))
            if done.returncode != 0 or not tarballs:
                output = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)  # Maven's colours
                lines = [ln for ln in output.splitlines() if "ERROR" in ln] or ["no tarball"]
                raise RegistryError(
                    f"fetching Apicurio Registry {version} from Maven Central failed: {lines[0].strip()[:300]}")
            try:
                with tarfile.open(tarballs[0]) as tar:
                    tar.extractall(work / "app", filter="data")
            except (tarfile.TarError, OSError) as exc:
                raise RegistryError(f"extracting Apicurio Registry {version} failed: {exc}") from None
            app = work / "app"
            if not (app / _runner_jar(version)).exists():  # tolerate a single top-level directory
                app = next((d for d in app.iterdir() if (d / _runner_jar(version)).exists()), None)
                if app is None:
                    raise RegistryError(f"the Apicurio Registry {version} tarball has no {_runner_jar(version)}")
            shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover of an older layout
            app.rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def _runner_jar(version: str = REGISTRY_VERSION) -> str:
    return f"apicurio-registry-app-{version}-runner.jar"


def _require(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise RegistryError(f"{tool} not found on PATH: {hint}")
    return path


def _cmdline(pid: int) -> bytes:
    """Process `pid`'s command line, arguments separated by NUL (empty if it cannot be read)."""
    if Path("/proc/self/cmdline").exists():
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return b""
    done = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True)
    return done.stdout.strip().replace(b" ", b"\0")


def _tail(path: Path, size: int = 20_000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
