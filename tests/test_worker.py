"""The worker on a real broker: verdicts, the reference model, poison pills, SIGTERM and SIGKILL of replicas."""

from __future__ import annotations

import gc
import json
import math
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.kafkatools import (
    WorkerProcess, WorkerThread, committed_offsets, end_offsets, produce_raw, produce_transactions, read_topic,
    wait_until,
)
from worker import kafka
from worker.avro.codec import Codec
from worker.model.scorer import OnnxScorer
from worker.records import Transaction
from worker.tools import traffic
from worker.tools.chaos import other_schema_record

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT.parent / "shared" / "reference-model"
CODEC = Codec()


def _verdicts(s, expected: int, timeout: float = 180.0) -> list[dict]:
    return [CODEC.decode_verdict(r.value) for r in read_topic(s, s.verdict_topic, expected, timeout)]


def _assert_all_committed(s) -> None:
    assert committed_offsets(s) == end_offsets(s, s.input_topic)


def test_every_transaction_gets_one_verdict_equal_to_a_direct_model_call(settings_for):
    """20,000 transactions over 6 partitions give exactly one verdict each, with the probability onnxruntime gives;
    start-up's objects are kept out of garbage collections while the worker runs, and given back when it stops."""
    s = settings_for(partitions=6)
    txns = list(traffic.generated(20_000, seed=3, prefix="t20k"))
    with WorkerThread(s) as w:
        produce_transactions(s, txns)
        verdicts = _verdicts(s, len(txns))
        assert gc.get_freeze_count() > 0
        assert w.stop() == 0
    assert gc.get_freeze_count() == 0
    counts = Counter(v["transaction_id"] for v in verdicts)
    assert len(counts) == len(txns) and max(counts.values()) == 1
    scorer = OnnxScorer.load(s.model_manifest)
    direct = scorer.predict(scorer.manifest.feature_matrix(txns))
    got = {v["transaction_id"]: v for v in verdicts}
    probs = np.array([got[t.transaction_id]["fraud_probability"] for t in txns])
    assert np.max(np.abs(probs - direct)) <= 1e-6
    v = got[txns[0].transaction_id]
    assert (v["card_id"], v["model_name"], v["model_version"]) == (txns[0].card_id, "fraud-gbt", "1.0.0")
    assert v["decision"] in {"APPROVE", "REVIEW", "DECLINE"} and v["is_fraud"] == (v["decision"] == "DECLINE")
    _assert_all_committed(s)


def test_a_full_producer_queue_never_hands_one_report_to_another_batch(settings_for):
    """Batches claim delivery slots before they produce: with the producer queue nearly full of unreported records
    (small queue, long linger, a backlog), each report must still reach its own batch, or a batch never completes
    and its partition never commits again."""
    s = settings_for(partitions=3, batch_max_size=1000,
                     producer_config={"queue.buffering.max.messages": "1500", "linger.ms": "50"})
    txns = list(traffic.generated(30_000, seed=31, prefix="ring"))
    produce_transactions(s, txns)
    with WorkerThread(s):
        verdicts = _verdicts(s, len(txns))
        wait_until(lambda: committed_offsets(s) == end_offsets(s, s.input_topic), 60, "every offset committed")
    assert len({v["transaction_id"] for v in verdicts}) == len(txns)


def test_reference_model_through_kafka_matches_expected(settings_for):
    """The reference model, run by its manifest alone, reproduces expected.json's probabilities and counts."""
    expected = json.loads((REFERENCE / "expected.json").read_text())
    rows = list(traffic.from_csv(REFERENCE / "card_transdata_sample.csv", prefix="ref"))
    manifest = ROOT / "models" / "reference-fraud-mlp.json"
    s = settings_for(partitions=6, model_manifest=manifest)
    with WorkerThread(s, manifest) as w:
        produce_transactions(s, [t for t, _ in rows])
        verdicts = {v["transaction_id"]: v for v in _verdicts(s, len(rows))}
        assert w.stop() == 0
    assert len(verdicts) == len(rows) == expected["sample_rows"]
    for example in expected["examples"]:
        got = verdicts[f"ref-{example['row']}"]["fraud_probability"]
        assert abs(got - example["probability"]) <= 1e-5, example
    threshold = expected["decision_threshold"]
    counts = Counter()
    for txn, label in rows:
        flagged = verdicts[txn.transaction_id]["fraud_probability"] > threshold
        assert flagged == verdicts[txn.transaction_id]["is_fraud"]
        counts[("t" if flagged == bool(label) else "f") + ("p" if flagged else "n")] += 1
    want = next(m for m in expected["metrics_on_sample"] if m["threshold"] == threshold)
    assert dict(counts) == {k: want[k] for k in ("tp", "fp", "fn", "tn")}


def _with(txn: Transaction, **changes) -> bytes:
    fields = {n: getattr(txn, n) for n in Transaction.__slots__} | changes
    return CODEC.encode_transaction(Transaction(**fields))


def test_poison_pills_are_dead_lettered_with_stage_and_original_bytes(settings_for):
    """Each kind of poison pill lands on the dead-letter topic with its stage and bytes; valid traffic flows on."""
    s = settings_for(partitions=3)
    good = [traffic.stamp(t, 1_790_000_000_000) for t in traffic.generated(300, seed=5, prefix="ok")]
    valid = CODEC.encode_transaction(good[0])
    poison = {
        "random-bytes": (bytes(np.random.default_rng(1).integers(0, 256, 64, dtype=np.uint8)), "deserialize"),
        "truncated": (valid[: len(valid) // 2], "deserialize"),
        "empty": (b"", "deserialize"),
        "other-schema": (other_schema_record(), "deserialize"),
        "nan": (_with(good[1], transaction_id="nan", distance_from_home=math.nan), "validate"),
        "inf": (_with(good[2], transaction_id="inf", ratio_to_median_purchase_price=math.inf), "validate"),
    }
    records = [(t.card_id.encode(), CODEC.encode_transaction(t), None) for t in good]
    for i, (name, (value, _)) in enumerate(poison.items()):
        records.insert(40 * (i + 1), (name.encode(), value, [("trace-id", name.encode())]))
    with WorkerThread(s) as w:
        produce_raw(s, records)
        verdicts = _verdicts(s, len(good))
        dead = read_topic(s, s.dead_letter_topic, len(poison), timeout=60)
        assert w.stop() == 0
    assert sorted(v["transaction_id"] for v in verdicts) == sorted(t.transaction_id for t in good)
    assert sorted(d.key.decode() for d in dead) == sorted(poison)
    for d in dead:
        value, stage = poison[d.key.decode()]
        assert (d.value or b"") == value
        assert d.headers["fraud.errors.stage"].decode() == stage
        assert d.headers["trace-id"] == d.key
        assert d.headers["fraud.errors.topic"].decode() == s.input_topic
        assert d.headers["fraud.errors.group.id"].decode() == s.group_id
        assert d.headers["fraud.errors.exception.message"]
        assert int(d.headers["fraud.errors.offset"]) >= 0
    _assert_all_committed(s)


def _verdict_count(s) -> int:
    return sum(end_offsets(s, s.verdict_topic).values())


@pytest.mark.parametrize("protocol, delivery", [("classic", "at_least_once"), ("consumer", "at_least_once"),
                                                ("consumer", "exactly_once")])
def test_sigterm_of_one_replica_loses_and_duplicates_nothing(protocol, delivery, settings_for, tmp_path):
    """Two replicas share the partitions; SIGTERM of one mid-stream leaves exactly one verdict per transaction, with
    either group protocol and either delivery mode."""
    s = settings_for(partitions=6, group_protocol=protocol, delivery=delivery,
                     **({"consumer_config": {}} if protocol == "consumer" else {}))
    n = 30_000
    a = WorkerProcess(s.model_copy(update={"worker_id": "replica-a"}), tmp_path / "a.log")
    b = WorkerProcess(s.model_copy(update={"worker_id": "replica-b"}), tmp_path / "b.log")
    assert a.wait_assigned() and b.wait_assigned(), a.log()[-2000:] + b.log()[-2000:]

    sender = threading.Thread(target=produce_transactions, args=(s, traffic.generated(n, seed=11, prefix="term"), 4000))
    sender.start()
    wait_until(lambda: _verdict_count(s) > n // 3, 120, "a third of the verdicts")
    assert a.terminate() == 0, a.log()[-3000:]
    sender.join()
    verdicts = _verdicts(s, n)
    assert b.terminate() == 0, b.log()[-3000:]
    counts = Counter(v["transaction_id"] for v in verdicts)
    assert len(counts) == n
    assert max(counts.values()) == 1, f"{sum(c - 1 for c in counts.values())} duplicates"
    assert "partitions_revoked" in a.log() and "worker_stopped" in a.log()
    _assert_all_committed(s)


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
def test_sigkill_and_restart_gives_every_transaction_a_verdict(delivery, settings_for, tmp_path, record_property):
    """SIGKILL of a worker mid-stream and a restart leave at least one verdict per transaction (exactly one, as a
    read_committed reader sees them, in exactly-once mode); duplicates are counted."""
    s = settings_for(partitions=6, delivery=delivery)
    n = 20_000
    first = WorkerProcess(s, tmp_path / "first.log")
    assert first.wait_assigned(), first.log()[-2000:]

    sender = threading.Thread(target=produce_transactions, args=(s, traffic.generated(n, seed=13, prefix="kill"), 4000))
    sender.start()
    wait_until(lambda: _verdict_count(s) > n // 3, 120, "a third of the verdicts")
    assert first.kill() == -9
    second = WorkerProcess(s, tmp_path / "second.log")
    sender.join()
    verdicts = _verdicts(s, n, timeout=240)
    assert second.terminate() == 0, second.log()[-3000:]
    counts = Counter(v["transaction_id"] for v in verdicts)
    duplicates = sum(c - 1 for c in counts.values())
    record_property("duplicates_after_sigkill", duplicates)
    print(f"\nSIGKILL mid-stream ({delivery}): {n} transactions, {len(counts)} with a verdict, {duplicates} duplicates")
    assert len(counts) == n
    if delivery == "exactly_once":
        assert duplicates == 0
        assert "transactions_initialised" in second.log()
    _assert_all_committed(s)


def test_latency_budget_cuts_the_linger_for_an_old_record(settings_for):
    """With a 10 s linger to fill batches, a record already 5 s old is scored at once under a 1 s latency budget
    (without the budget it would wait out the linger, past this test's 8 s read)."""
    s = settings_for(partitions=1, batch_max_wait_ms=10_000, latency_budget_ms=1_000)
    with WorkerThread(s) as w:
        wait_until(lambda: w.worker.health.in_group, 60, "the worker to join its group")
        producer = kafka.plain_producer({"bootstrap.servers": s.bootstrap_servers})
        txn = next(traffic.generated(1, prefix="old"))
        producer.produce(s.input_topic, Codec().encode_transaction(traffic.stamp(txn, int(time.time() * 1000))),
                         txn.card_id.encode(), timestamp=int(time.time() * 1000) - 5_000)
        assert producer.flush(10) == 0
        assert len(read_topic(s, s.verdict_topic, 1, timeout=8)) == 1


def test_linger_is_cut_by_the_first_record_age_and_the_batch_cost():
    """The wait for more records is the linger, less what the budget has left after the record's age and the batch's
    own time; never negative; the whole linger without a budget."""
    from worker.kafka import linger_s

    assert linger_s(0.005, 0.0, 10.0, 0.0) == 0.005
    assert linger_s(0.5, 1.0, 0.2, 0.1) == 0.5
    assert linger_s(0.5, 1.0, 0.6, 0.1) == pytest.approx(0.3)
    assert linger_s(0.5, 1.0, 5.0, 0.1) == 0.0
    assert linger_s(0.5, 1.0, -3.0, 0.0) == 0.5  # a timestamp from the future counts as age 0
