"""Helpers for integration tests: produce, read topics back, run workers in a thread or a process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition
from pydantic import SecretStr

from worker import traffic
from worker.app import Worker
from worker.model import OnnxScorer
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Record:
    """A record read back from a topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


def producer(s: Settings) -> Producer:
    """An idempotent producer for test traffic."""
    return Producer({"bootstrap.servers": s.bootstrap_servers, "enable.idempotence": True, "linger.ms": 5})


def produce_transactions(s: Settings, txns, rate: float = 0.0) -> int:
    """Produce Transactions to the input topic keyed by card_id."""
    return traffic.produce(producer(s), s.input_topic, txns, rate=rate)


def produce_raw(s: Settings, records: list[tuple[bytes | None, bytes | None, list | None]]) -> None:
    """Produce raw (key, value, headers) records to the input topic."""
    p = producer(s)
    for key, value, headers in records:
        p.produce(s.input_topic, value, key, headers=headers)
    assert p.flush(30) == 0


def read_topic(s: Settings, topic: str, expected: int, timeout: float = 120.0, idle: float = 5.0) -> list[Record]:
    """Read a topic from the start until `expected` records arrived, or `idle` s passed after the timeout."""
    c = Consumer({"bootstrap.servers": s.bootstrap_servers, "group.id": f"reader-{time.time_ns()}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    out: list[Record] = []
    deadline, last = time.monotonic() + timeout, time.monotonic()
    try:
        while True:
            msgs = c.consume(1000, 0.2)
            for m in msgs:
                assert m.error() is None, m.error()
                out.append(Record(m.partition(), m.offset(), m.key(), m.value(), dict(m.headers() or [])))
                last = time.monotonic()
            now = time.monotonic()
            if len(out) >= expected and now - last > 0.5:
                return out
            if now > deadline and now - last > idle:
                return out
    finally:
        c.close()


def end_offsets(s: Settings, topic: str) -> dict[int, int]:
    """High watermark of each partition of a topic."""
    c = Consumer({"bootstrap.servers": s.bootstrap_servers, "group.id": "probe"})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    finally:
        c.close()


def committed_offsets(s: Settings) -> dict[int, int]:
    """The group's committed offset for each input partition (-1001 when none)."""
    c = Consumer({"bootstrap.servers": s.bootstrap_servers, "group.id": s.group_id})
    try:
        parts = [TopicPartition(s.input_topic, p) for p in end_offsets(s, s.input_topic)]
        return {tp.partition: tp.offset for tp in c.committed(parts, timeout=10)}
    finally:
        c.close()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll `predicate` until it is true; fail the test saying `what` did not happen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class WorkerThread:
    """A Worker running in a thread of the test process, stopped by its Event."""

    def __init__(self, s: Settings, manifest: str | Path | None = None):
        self.worker = Worker(s, OnnxScorer.load(manifest or s.model_manifest))
        self.exit_code: int | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.exit_code = self.worker.run()

    def __enter__(self) -> WorkerThread:
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> int | None:
        """Set the stop event and wait for the loop to flush, commit and return."""
        self.worker.stop.set()
        self._thread.join(timeout)
        return self.exit_code

    def __exit__(self, *exc) -> None:
        self.stop()


def settings_env(s: Settings) -> dict[str, str]:
    """The FRAUD_* environment that reproduces these settings in a child process."""
    env = {}
    for name, value in s.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"FRAUD_{name.upper()}"] = json.dumps(value) if isinstance(value, dict) else str(value)
    return env


class WorkerProcess:
    """`python -m worker run` in a child process, logging to a file."""

    def __init__(self, s: Settings, log_path: Path, **extra_env: str):
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
        env.update(settings_env(s))
        env.update(extra_env)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "worker", "run"], cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        """The process's output so far."""
        return self.log_path.read_text(errors="replace")

    def wait_assigned(self, timeout: float = 60.0) -> None:
        """Wait until the worker has joined the group and got partitions."""
        wait_until(lambda: "partitions_assigned" in self.log() or self.proc.poll() is not None, timeout, "assignment")
        assert self.proc.poll() is None, f"worker exited early:\n{self.log()[-3000:]}"

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait for the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> int:
        """SIGKILL and reap."""
        self.proc.kill()
        return self.wait(10)

    def wait(self, timeout: float) -> int:
        """Wait for exit; return the code."""
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()
