"""Helpers for integration tests: produce, read topics back, run workers in a thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from worker import kafka
from worker.app import Worker
from worker.kafka import Record
from worker.model.scorer import OnnxScorer
from worker.settings import Settings
from worker.tools import traffic
from worker.tools.replica import Replica as WorkerProcess

__all__ = ["Record", "WorkerProcess", "WorkerThread", "committed_offsets", "end_offsets", "produce_raw",
           "produce_transactions", "read_topic", "wait_until"]


def _conf(s: Settings) -> dict:
    return {"bootstrap.servers": s.bootstrap_servers}


def produce_transactions(s: Settings, txns, rate: float = 0.0) -> int:
    """Produce Transactions to the input topic keyed by card_id."""
    return traffic.produce(kafka.plain_producer(_conf(s)), s.input_topic, txns, rate=rate)


def produce_raw(s: Settings, records: list[tuple[bytes | None, bytes | None, list | None]]) -> None:
    """Produce raw (key, value, headers) records to the input topic."""
    p = kafka.plain_producer(_conf(s))
    for key, value, headers in records:
        p.produce(s.input_topic, value, key, headers=headers)
    assert p.flush(30) == 0


def read_topic(s: Settings, topic: str, expected: int, timeout: float = 120.0) -> list[Record]:
    """Read a topic from the start until `expected` records arrived or the timeout passed."""
    return kafka.read_topic(_conf(s), topic, expected, timeout)


def end_offsets(s: Settings, topic: str) -> dict[int, int]:
    """High watermark of each partition of a topic."""
    return kafka.end_offsets(_conf(s), topic)


def committed_offsets(s: Settings) -> dict[int, int]:
    """The group's committed offset for each input partition (-1001 when none)."""
    return kafka.committed_offsets(_conf(s), s.group_id, s.input_topic)


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

    def __init__(self, s: Settings, manifest: str | Path | None = None, scorer=None):
        self.worker = Worker(s, scorer or OnnxScorer.load(manifest or s.model_manifest))
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
