"""Exactly-once delivery on a real broker: zombies are fenced, `check` fences no one, slow models are not fenced."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from tests.fakes import SlowScorer
from tests.kafkatools import (
    WorkerProcess, WorkerThread, committed_offsets, end_offsets, produce_transactions, read_topic, wait_until,
)
from worker import kafka
from worker.avro.codec import Codec
from worker.model.scorer import OnnxScorer
from worker.tools import traffic

pytestmark = pytest.mark.kafka
CODEC = Codec()


def _verdict_ids(s, expected: int) -> Counter:
    records = read_topic(s, s.verdict_topic, expected, timeout=180)
    return Counter(CODEC.decode_verdict(r.value)["transaction_id"] for r in records)


def _records_written(s) -> int:
    """Every record in the verdict topic, aborted ones and transaction markers included."""
    return sum(end_offsets(s, s.verdict_topic).values())


def test_paused_replica_is_fenced_by_the_group_and_duplicates_nothing(settings_for, tmp_path):
    """A replica frozen (SIGSTOP) past the session timeout loses its partitions; when it wakes, its open transaction
    cannot commit (KIP-447 fencing), so a read_committed reader sees exactly one verdict per transaction."""
    s = settings_for(partitions=6, delivery="exactly_once")
    n = 30_000
    a = WorkerProcess(s.model_copy(update={"worker_id": "zombie-a"}), tmp_path / "a.log")
    b = WorkerProcess(s.model_copy(update={"worker_id": "zombie-b"}), tmp_path / "b.log")
    assert a.wait_assigned() and b.wait_assigned(), a.log()[-2000:] + b.log()[-2000:]
    sender = threading.Thread(target=produce_transactions, args=(s, traffic.generated(n, seed=17, prefix="zombie"), 2000))
    sender.start()
    wait_until(lambda: _records_written(s) > n // 4, 120, "a quarter of the verdicts")
    a.proc.send_signal(signal.SIGSTOP)
    seen = len(b.log())
    try:
        # session.timeout.ms is 6 s in these tests: b takes a's partitions and re-scores a's open transaction.
        wait_until(lambda: '"total": 6' in b.log()[seen:], 60, "b to take over a's partitions")
        time.sleep(1)
    finally:
        a.proc.send_signal(signal.SIGCONT)
    sender.join()
    ids = _verdict_ids(s, n)
    code_b = b.terminate()
    code_a = a.terminate()
    assert len(ids) == n and max(ids.values()) == 1, f"{n - len(ids)} missing, {sum(ids.values()) - len(ids)} duplicates"
    # b may be stopped by the bound on a transactional call that librdkafka let hang through the rebalance
    # (README, "A known librdkafka hang"); any other unclean exit fails.
    assert code_b == 0 or "did not return within" in b.log(), b.log()[-3000:]
    # Woken, a either aborts its transaction and rejoins (exit 0) or finds its producer fenced and stops (exit 1).
    assert code_a == 0 or "worker_failed" in a.log(), a.log()[-3000:]
    assert "partitions_lost" in a.log() or "worker_failed" in a.log(), a.log()[-3000:]
    assert committed_offsets(s) == end_offsets(s, s.input_topic)


def test_check_does_not_fence_a_live_replica_with_the_same_transactional_id(settings_for, tmp_path):
    """`fraud-worker check` with a running replica's settings leaves that replica's producer alive."""
    s = settings_for(partitions=2, delivery="exactly_once", group_instance_id="pod-0")
    live = WorkerProcess(s, tmp_path / "live.log")
    assert live.wait_assigned(), live.log()[-2000:]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")} | s.to_env()
    done = subprocess.run([sys.executable, "-m", "worker", "check"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout.strip().splitlines()[-1])
    assert (shown["delivery"], shown["transactional_id"]) == ("exactly_once", kafka.transactional_id(s))
    txns = list(traffic.generated(500, seed=5, prefix="check"))
    produce_transactions(s, txns)
    ids = _verdict_ids(s, len(txns))
    assert live.terminate() == 0, live.log()[-3000:]
    assert set(ids) == {t.transaction_id for t in txns}
    assert "worker_failed" not in live.log()


def test_batches_shrink_below_the_transaction_timeout(settings_for):
    """A model slow enough to outlast the transaction timeout makes the worker halve its batches; nothing is fenced."""
    s = settings_for(partitions=2, delivery="exactly_once", producer_config={"transaction.timeout.ms": "4000"})
    txns = list(traffic.generated(3_000, seed=23, prefix="slow-eos"))
    produce_transactions(s, txns)
    with WorkerThread(s, scorer=SlowScorer(OnnxScorer.load(s.model_manifest), seconds_per_row=0.002)) as w:
        ids = _verdict_ids(s, len(txns))
        limit = w.worker._batch_limit
        assert w.stop() == 0 and w.worker.fatal is None, w.worker.fatal
    assert set(ids) == {t.transaction_id for t in txns} and max(ids.values()) == 1
    assert limit < s.batch_max_size
