"""The real Schema Registry: BACKWARD compatibility, schema evolution, and the project's local registry's behaviour."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka.schema_registry import Schema
from confluent_kafka.schema_registry.error import SchemaRegistryError

from worker.tools.localregistry import LocalRegistry, RegistryError, answers
from worker.tools.localservice import free_ports

ROOT = Path(__file__).resolve().parent.parent
_V1 = {"type": "record", "name": "Transaction", "namespace": "fraud",
       "fields": [{"name": "id", "type": "string"}, {"name": "amount", "type": "double"}]}
_V2 = {**_V1, "fields": [*_V1["fields"], {"name": "country", "type": "string", "default": "NL"}]}
_V3 = {**_V2, "fields": [{"name": "id", "type": "string"}, {"name": "amount", "type": "string"},
                         {"name": "country", "type": "string", "default": "NL"}]}


def _avro(schema: dict) -> Schema:
    return Schema(json.dumps(schema), "AVRO")


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run `fraud-worker ARGS` in a child process."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "FRAUD_CACHE_DIR", "JAVA_HOME")}
    return subprocess.run([sys.executable, "-m", "worker", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=180, env=env)


@pytest.fixture(scope="module")
def cli_registry():
    """A registry started by `fraud-worker registry start` on a free port, in this checkout's var/registry-PORT."""
    port = free_ports(1)[0]
    registry = LocalRegistry(port=port)
    try:
        began = time.monotonic()
        done = _cli("registry", "start", "--port", str(port))
        if done.returncode != 0:
            pytest.fail(f"`fraud-worker registry start` failed: {done.stderr.strip()}. These tests need the project's "
                        "local registry: install Java 17 and Maven.", pytrace=False)
        print(f"registry start via the CLI took {time.monotonic() - began:.1f}s")
        yield registry, json.loads(done.stdout)
    finally:
        registry.stop()
        shutil.rmtree(registry.home, ignore_errors=True)


def test_global_compatibility_is_backward(registry_client):
    """The registry's global compatibility level is BACKWARD, Confluent's default."""
    assert registry_client.get_compatibility() == "BACKWARD"


def test_backward_evolution_is_accepted_and_an_incompatible_one_refused(registry_client, unique):
    """Adding a field with a default registers a new version; changing a field from double to string is refused."""
    subject = f"tx-{unique}-value"
    first = registry_client.register_schema(subject, _avro(_V1))
    second = registry_client.register_schema(subject, _avro(_V2))
    assert first != second
    assert registry_client.get_versions(subject) == [1, 2]
    assert registry_client.test_compatibility(subject, _avro(_V3)) is False
    with pytest.raises(SchemaRegistryError) as info:
        registry_client.register_schema(subject, _avro(_V3))
    assert info.value.http_status_code == 409
    assert registry_client.get_versions(subject) == [1, 2]


def test_unknown_schema_id_is_a_40403(registry_client):
    """Fetching a schema id that was never registered fails with HTTP 404 and Confluent's error code 40403."""
    with pytest.raises(SchemaRegistryError) as info:
        registry_client.get_schema(2_000_000_000)
    assert (info.value.http_status_code, info.value.error_code) == (404, 40403)


def test_cli_start_and_status_report_the_started_registry(cli_registry):
    """`registry start` prints the URL and log, and `registry status` reports that registry running with its pid."""
    registry, started = cli_registry
    assert started == {"url": registry.url, "log": str(ROOT / "var" / f"registry-{registry.port}" / "registry.log")}
    assert registry.url == f"http://127.0.0.1:{registry.port}/apis/ccompat/v7" and answers(registry.url)
    done = _cli("registry", "status", "--port", str(registry.port), cwd=Path("/"))  # from elsewhere: same home
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"running": True, "pid": registry.pid(), "url": registry.url,
                                       "home": str(registry.home)}
    assert registry.pid() is not None


def test_second_start_is_a_no_op(cli_registry):
    """Starting a running registry again returns its URL at once and keeps the same process."""
    registry, _ = cli_registry
    pid = registry.pid()
    again = LocalRegistry(port=registry.port)
    began = time.monotonic()
    assert again.start(timeout=5) == registry.url
    assert time.monotonic() - began < 2
    assert again.pid() == pid is not None and not again.launched
    done = _cli("registry", "start", "--port", str(registry.port))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["url"] == registry.url and registry.pid() == pid


def test_pause_hangs_the_registry_and_stop_ends_even_a_paused_one(cli_registry):
    """A paused registry stops answering, answers again once resumed, and `registry stop` ends it while paused."""
    registry, _ = cli_registry
    pid = registry.pid()
    assert registry.pause() == pid
    try:
        assert not answers(registry.url, timeout=1.5)
    finally:
        registry.resume()
    assert answers(registry.url, timeout=10)
    registry.pause()
    done = _cli("registry", "stop", "--port", str(registry.port))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"stopped": True, "pid": pid, "port": registry.port, "home": str(registry.home)}
    assert not registry.running() and not answers(registry.url)
    with pytest.raises(RegistryError):
        registry.pause()


def test_taken_port_is_one_clear_error(tmp_path):
    """A port held by another process stops start-up, in code and on the CLI, with one line that names the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(RegistryError) as info:
            LocalRegistry(port=port, home=tmp_path / "r").start(timeout=5)
        assert f"port {port}" in str(info.value) and "\n" not in str(info.value)
        try:
            done = _cli("registry", "start", "--port", str(port))
        finally:
            shutil.rmtree(ROOT / "var" / f"registry-{port}", ignore_errors=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"fraud-worker: {info.value}"]
