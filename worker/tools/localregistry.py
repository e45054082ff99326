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
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .localservice import CACHE, LocalProcess, local_home, require, runs_with

REGISTRY_VERSION = "3.0.9"  # the last Apicurio line on Java 17; 3.3.x needs Java 21
_ARTIFACT = "io.apicurio:apicurio-registry-app:{version}:tar.gz:all"
_HOME_PROPERTY = "-Dfraud.registry.home="  # names the home in the command line, so a pid is checked against it


class RegistryError(RuntimeError):
    """The local Schema Registry cannot be fetched, started or stopped."""


def registry_home(port: int, name: str = "registry") -> Path:
    """This checkout's home for the registry on `port`: `<checkout>/var/<name>-<port>`."""
    return local_home(port, name)


def answers(url: str, timeout: float = 1.0) -> bool:
    """Whether the Confluent-compatible API at `url` (…/apis/ccompat/v7) answers `GET /subjects` with 200."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/subjects", timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, ValueError):  # URLError, HTTPError, timeouts and refused connections are OSErrors
        return False


@dataclass
class LocalRegistry(LocalProcess):
    """An Apicurio Registry bound to 127.0.0.1 with in-memory storage, its pid file and log under `home`.

    `home` defaults to this checkout's `var/registry-<port>`. The registry is only ever adopted, reported, paused
    or stopped through the pid file in `home`, and only while that pid's command line names this home.
    """

    port: int = 8081
    home: Path | None = None
    heap: str = "384m"

    kind = "registry"
    title = "the registry"
    error = RegistryError
    address_name = "url"

    @property
    def url(self) -> str:
        """The Confluent-compatible Schema Registry URL (what `schema.registry.url` should be)."""
        return f"http://127.0.0.1:{self.port}/apis/ccompat/v7"

    address = url

    def answering(self, timeout: float = 1.0) -> bool:
        """Whether a Confluent-compatible registry answers at the URL, whoever started it."""
        return answers(self.url, timeout)

    def pause(self) -> int:
        """SIGSTOP the registry (a hung registry, for fault tests): connections open but nothing answers."""
        return self._send(signal.SIGSTOP)

    def resume(self) -> int:
        """SIGCONT a paused registry."""
        return self._send(signal.SIGCONT)

    def _send(self, sig: int) -> int:
        pid = self.pid()
        if pid is None:
            raise RegistryError(f"no registry of {self.home} is running")
        os.kill(pid, sig)
        return pid

    def _home_arg(self) -> str:
        return f"{_HOME_PROPERTY}{self.home}"

    def _runs_on_port(self, pid: int) -> bool:
        return runs_with(pid, f"-Dquarkus.http.port={self.port}")

    def _command(self, java: str) -> list[str]:
        return [java, f"-Xmx{self.heap}", "-Djava.awt.headless=true", self._home_arg(),
                f"-Dquarkus.http.port={self.port}", "-Dquarkus.http.host=127.0.0.1",
                "-jar", str(fetch_registry() / _runner_jar())]

    def _come_up(self, proc: subprocess.Popen, timeout: float) -> None:
        try:
            super()._come_up(proc, timeout)
            self._set_backward()
        except RegistryError:
            self.stop(timeout=5)  # a half-started registry would hold the port with no way to adopt it
            raise

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
        mvn = require("mvn", "install Apache Maven (e.g. apt-get install maven) so the registry can be fetched",
                      RegistryError)
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
