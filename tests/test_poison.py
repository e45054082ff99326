"""Every record ends in exactly one place: hostile records and refused outputs on a real broker, with strict topics."""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from tests.kafkatools import WorkerThread, committed_offsets, end_offsets, read_topic
from worker.avro.codec import Codec
from worker.records import Transaction
from worker.tools import traffic

pytestmark = pytest.mark.kafka
CODEC = Codec()
MiB = 1 << 20
VERDICT_LIMIT = 200_000  # the verdict topic's max.message.bytes
DEAD_LETTER_LIMIT = 300_000  # the dead-letter topic's max.message.bytes
OLD_MS = 1_000_000_000_000  # 2001-09-09: older than the dead-letter topic accepts
NOW_MS = int(time.time() * 1000)


@dataclass
class Case:
    """One input record and where it must end: a verdict, or a dead letter of a stage (adjusted or not)."""

    name: str
    key: bytes | None
    value: bytes | None
    headers: list | None = None
    timestamp: int = 0
    stage: str | None = None  # None: a verdict
    adjusted: bool = False


def _value(txn: Transaction) -> bytes:
    return CODEC.encode_transaction(txn)


def _create(s, verdict_config: dict[str, str], dead_letter_config: dict[str, str]) -> None:
    client = AdminClient({"bootstrap.servers": s.bootstrap_servers})
    # Kafka 4 refuses timestamps over an hour ahead by default (KIP-937); the input topic takes them, as a 3.x one did.
    anything = {"max.message.bytes": str(8 * MiB), "message.timestamp.after.max.ms": str(2**63 - 1)}
    topics = [NewTopic(s.input_topic, 1, 1, config=anything),
              NewTopic(s.verdict_topic, 1, 1, config=verdict_config),
              NewTopic(s.dead_letter_topic, 1, 1, config=dead_letter_config)]
    for future in client.create_topics(topics).values():
        future.result()


def _produce(s, cases: list[Case]) -> dict[int, Case]:
    """Produce the cases in order to partition 0; return them by the offset the broker gave each."""
    producer = Producer({"bootstrap.servers": s.bootstrap_servers, "enable.idempotence": True,
                         "message.max.bytes": 8 * MiB, "linger.ms": 20})
    offsets: dict[int, Case] = {}
    for case in cases:
        producer.produce(s.input_topic, case.value, case.key, partition=0, headers=case.headers,
                         timestamp=case.timestamp,
                         on_delivery=lambda err, msg, case=case: offsets.__setitem__(msg.offset(), case) if err is None
                         else pytest.fail(f"input {case.name} refused: {err}"))
        producer.poll(0)
    assert producer.flush(60) == 0
    assert len(offsets) == len(cases)
    return offsets


def _run_and_audit(s, cases: list[Case]) -> None:
    """Run one worker over the cases; check each input's single outcome, the offsets and the exit code."""
    by_offset = _produce(s, cases)
    want_verdicts = Counter((c.key, CODEC.decode_transaction(c.value).transaction_id) for c in cases if c.stage is None)
    want_dead = {o: c for o, c in by_offset.items() if c.stage is not None}
    with WorkerThread(s) as w:
        verdicts = read_topic(s, s.verdict_topic, sum(want_verdicts.values()), timeout=120)
        dead = read_topic(s, s.dead_letter_topic, len(want_dead), timeout=60)
        assert w.stop() == 0 and w.worker.fatal is None, w.worker.fatal
    got_verdicts = Counter((r.key, CODEC.decode_verdict(r.value)["transaction_id"]) for r in verdicts)
    assert got_verdicts == want_verdicts
    got_dead = Counter(int(d.headers["fraud.errors.offset"]) for d in dead)
    want = Counter(want_dead.keys())
    assert got_dead == want, {"extra": [by_offset[o].name for o in got_dead - want],
                              "missing": [by_offset[o].name for o in want - got_dead]}
    for d in dead:
        case = want_dead[int(d.headers["fraud.errors.offset"])]
        assert d.headers["fraud.errors.stage"].decode() == case.stage, case.name
        assert ("fraud.errors.adjusted" in d.headers) == case.adjusted, (case.name, d.headers.get("fraud.errors.adjusted"))
        if case.adjusted:
            assert d.value is None and d.headers["fraud.errors.dead.letter.refused"], case.name
            assert len(d.key) <= 80, case.name
        else:
            assert (d.key, d.value) == (case.key, case.value), case.name
            if case.timestamp:
                assert d.timestamp_ms == case.timestamp, case.name
    assert committed_offsets(s) == end_offsets(s, s.input_topic)


DELIVERY = pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])


@DELIVERY
def test_refused_verdict_among_identical_values_dead_letters_exactly_the_refused_one(settings_for, delivery):
    """A verdict refused for its 250 kB key is dead-lettered as that input; three inputs with the same value get verdicts."""
    s = settings_for(create=False, delivery=delivery)
    _create(s, {"max.message.bytes": str(VERDICT_LIMIT)}, {})
    txn = traffic.stamp(next(traffic.generated(1, seed=1, prefix="same")), NOW_MS)
    value = _value(txn)
    # Keys and values are random: the broker checks the compressed (lz4) batch against max.message.bytes.
    cases = [Case("big-key", os.urandom(250_000), value, stage="produce")]
    cases += [Case(f"same-{i}", f"card-{i}".encode(), value) for i in range(3)]
    _run_and_audit(s, cases)


def _corpus() -> list[Case]:
    good = [traffic.stamp(t, NOW_MS) for t in traffic.generated(600, seed=9, prefix="ok")]
    junk = os.urandom
    shared = good[0]
    hostile = [
        Case("value-1.5MiB", b"v1", junk(3 * MiB // 2), stage="deserialize", adjusted=True),
        Case("value-6MiB", b"v6", junk(6 * MiB), stage="deserialize", adjusted=True),
        Case("value-250kB-a", b"v250a", junk(250_000), stage="deserialize"),
        Case("value-250kB-b", b"v250b", junk(250_000), stage="deserialize"),
        Case("key-250kB", junk(250_000), _value(shared), stage="produce"),
        Case("key-400kB", junk(400_000), _value(shared), stage="produce", adjusted=True),
        Case("same-value-1", b"same-1", _value(shared)),
        Case("same-value-2", b"same-2", _value(shared)),
        Case("null-key-on-compacted-verdicts", None, _value(good[1]), stage="produce"),
        Case("null-value", b"null", None, stage="deserialize"),
        Case("empty-value", b"empty", b"", stage="deserialize"),
        Case("binary-headers", b"bin", junk(40),
             [("raw", bytes(range(256))), ("", b"\xff\xfe"), ("none", None), ("dup", b"1"), ("dup", b"2")],
             stage="deserialize"),
        Case("valid-with-binary-headers", b"good-bin", _value(good[2]), [("raw", bytes(range(256))), ("none", None)]),
        Case("headers-350kB", b"hdr", junk(10), [(f"h{i}", junk(1000)) for i in range(350)], stage="deserialize",
             adjusted=True),
        Case("empty-id-noncanonical", b"noncanon", b"\x80\x80\x00" + _value(good[3])[1 + len(good[3].transaction_id):],
             stage="validate"),
        Case("id-128-bytes-3-byte-length", b"long-id", b"\x80\x82\x00" + b"i" * 128
             + _value(good[6])[1 + len(good[6].transaction_id):]),
        Case("old-timestamp-poison", b"old", junk(30), timestamp=OLD_MS, stage="deserialize", adjusted=True),
        Case("future-timestamp-poison", b"future", junk(30), timestamp=NOW_MS + 10 * 86_400_000,
             stage="deserialize", adjusted=True),
        Case("valid-with-old-timestamp", b"good-old", _value(good[4]), timestamp=OLD_MS),
        Case("non-utf8-key", b"\xff\xfe\x00card", _value(good[5])),
    ]
    cases = [Case(f"good-{i}", t.card_id.encode(), _value(t)) for i, t in enumerate(good[7:])]
    for i, case in enumerate(hostile):
        cases.insert(25 * (i + 1), case)
    return cases


@DELIVERY
def test_poison_corpus_every_input_ends_in_exactly_one_place(settings_for, delivery):
    """Oversized values, keys and headers, identical values, null and empty values, binary headers, non-canonical
    varints and timestamps the dead-letter topic refuses, mixed into valid traffic: one verdict or one dead letter each,
    in both delivery modes (exactly-once: as a read_committed reader sees the topics)."""
    s = settings_for(create=False, delivery=delivery)
    _create(s, {"max.message.bytes": str(VERDICT_LIMIT), "cleanup.policy": "compact"},
            {"max.message.bytes": str(DEAD_LETTER_LIMIT), "message.timestamp.before.max.ms": str(86_400_000),
             "message.timestamp.after.max.ms": str(3_600_000)})
    _run_and_audit(s, _corpus())
