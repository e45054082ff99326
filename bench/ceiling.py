"""The ceiling: consume raw records and produce the same bytes (same key), committing only acknowledged output."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402

from worker.kafka import QUIET_LOG, consumer_config, producer_config  # noqa: E402
from worker.settings import Settings  # noqa: E402


class Batch:
    """One consumed batch: its outstanding deliveries and the next offset per partition."""

    def __init__(self, msgs: list) -> None:
        self.left = len(msgs)
        self.offsets = {(m.topic(), m.partition()): m.offset() + 1 for m in msgs}
        self.failed: str | None = None

    def delivered(self, err, _msg) -> None:
        """Delivery callback: count the acknowledgement, or remember the failure."""
        if err is not None:
            self.failed = err.str()
        self.left -= 1


def run(bootstrap: str, group: str, source: str, target: str) -> int:
    """Copy `source` to `target` until SIGTERM; return 0, or 1 if an output was not acknowledged."""
    # The worker's own client settings (idempotent acks=all producer, manual commits), so only the work differs.
    s = Settings(bootstrap_servers=bootstrap, group_id=group, input_topic=source, worker_id=f"ceiling-{group}", metrics_port=0)
    producer = Producer({**producer_config(s), "logger": QUIET_LOG})
    consumer = Consumer({**consumer_config(s), "logger": QUIET_LOG})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    consumer.subscribe([source], on_assign=lambda c, parts: print("assigned", len(parts), flush=True))
    pending: deque[Batch] = deque()
    safe: dict[tuple[str, int], int] = {}
    dirty, last_commit = False, time.monotonic()
    while not stop.is_set():
        msgs = [m for m in consumer.consume(1000, 0.5) if m.error() is None]
        if msgs:
            batch = Batch(msgs)
            pending.append(batch)
            for m in msgs:
                while True:
                    try:
                        producer.produce(target, m.value(), m.key(), on_delivery=batch.delivered)
                        break
                    except BufferError:
                        producer.poll(0.05)
        producer.poll(0)
        while pending and pending[0].left == 0:
            if pending[0].failed:
                print("output not acknowledged:", pending[0].failed, flush=True)
                return 1
            safe.update(pending.popleft().offsets)
            dirty = True
        if dirty and time.monotonic() - last_commit >= s.commit_interval_ms / 1000:
            consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in safe.items()], asynchronous=True)
            dirty, last_commit = False, time.monotonic()
    producer.flush(30)
    while pending and pending[0].left == 0 and not pending[0].failed:
        safe.update(pending.popleft().offsets)
    if safe:
        consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in safe.items()], asynchronous=False)
    consumer.close()
    return 0


def main() -> None:
    """Command line: ceiling.py BOOTSTRAP GROUP SOURCE TARGET."""
    p = argparse.ArgumentParser(description=__doc__)
    for name in ("bootstrap", "group", "source", "target"):
        p.add_argument(name)
    a = p.parse_args()
    sys.exit(run(a.bootstrap, a.group, a.source, a.target))


if __name__ == "__main__":
    main()
