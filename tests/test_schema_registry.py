"""Input and verdicts through a real Schema Registry: wire format, schema evolution, bad frames, a hung registry."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import fastavro
import numpy as np
import pytest
from confluent_kafka import Producer
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

from tests.kafkatools import WorkerThread, committed_offsets, end_offsets, read_topic, wait_until
from worker.avro.codec import Codec
from worker.avro.registry import frame
from worker.model.scorer import OnnxScorer
from worker.records import Transaction
from worker.tools import traffic
from worker.tools.localregistry import LocalRegistry, RegistryError
from worker.tools.localservice import free_ports

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parent.parent
REFERENCE_MANIFEST = ROOT / "models" / "reference-fraud-mlp.json"
REFERENCE_DATA = ROOT.parent / "shared" / "reference-model" / "card_transdata_sample.csv"
CODEC = Codec()
V1 = json.loads((ROOT / "schemas" / "transaction.avsc").read_text())


def _v2() -> dict:
    """A backward-compatible evolution of V1: amount moved last, a field added with a default."""
    fields = [f for f in V1["fields"] if f["name"] != "amount"]
    fields += [{"name": "channel", "type": "string", "default": "web"}, next(f for f in V1["fields"] if f["name"] == "amount")]
    return {**V1, "fields": fields}


def _encode(schema: dict, txn: Transaction, **extra) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema),
                               {n: getattr(txn, n) for n in Transaction.__slots__} | extra)
    return out.getvalue()


def _produce(s, records: list[tuple[bytes | None, bytes | None]]) -> None:
    producer = Producer({"bootstrap.servers": s.bootstrap_servers, "enable.idempotence": True})
    for key, value in records:
        producer.produce(s.input_topic, value, key)
    assert producer.flush(30) == 0


def _reference_rows(n: int) -> list[Transaction]:
    now = int(time.time() * 1000)
    return [traffic.stamp(t, now) for t, _ in traffic.from_csv(REFERENCE_DATA, prefix="sr")][:n]


def test_evolved_writer_schemas_interleaved_score_like_a_direct_model_call(settings_for, schema_registry_url):
    """v1 and v2 (reordered, a field added) writer schemas in one topic: one verdict each, no dead letter, and the
    reference model's probabilities within 1e-5 of onnxruntime on the same rows."""
    s = settings_for(partitions=3, model_manifest=REFERENCE_MANIFEST, schema_registry_url=schema_registry_url)
    client = SchemaRegistryClient({"url": schema_registry_url})
    subject = f"{s.input_topic}-value"
    v1 = client.register_schema(subject, Schema(json.dumps(V1), "AVRO"))
    v2 = client.register_schema(subject, Schema(json.dumps(_v2()), "AVRO"))
    assert v1 != v2
    txns = _reference_rows(2_000)
    records = [(t.card_id.encode(), frame(v1) + _encode(V1, t)) if i % 2 else
               (t.card_id.encode(), frame(v2) + _encode(_v2(), t, channel="pos")) for i, t in enumerate(txns)]
    with WorkerThread(s, REFERENCE_MANIFEST) as w:
        _produce(s, records)
        verdicts = read_topic(s, s.verdict_topic, len(txns))
        dead = read_topic(s, s.dead_letter_topic, 1, timeout=3)
        assert w.stop() == 0
    assert dead == []
    verdict_id = client.get_latest_version(f"{s.verdict_topic}-value").schema_id
    assert all(r.value[:5] == frame(verdict_id) for r in verdicts)
    got = {v["transaction_id"]: v["fraud_probability"] for v in (CODEC.decode_verdict(r.value) for r in verdicts)}
    assert len(got) == len(verdicts) == len(txns)
    scorer = OnnxScorer.load(REFERENCE_MANIFEST)
    direct = scorer.predict(scorer.manifest.feature_matrix(txns))
    assert np.max(np.abs(np.array([got[t.transaction_id] for t in txns]) - direct)) <= 1e-5
    assert committed_offsets(s) == end_offsets(s, s.input_topic)


def test_bad_frames_and_unusable_schemas_are_dead_letters_with_their_reason(settings_for, schema_registry_url):
    """Unknown schema id, wrong magic byte, a short frame, an unresolvable writer schema and a truncated body each
    become one dead letter saying exactly that; the good records around them get verdicts."""
    s = settings_for(partitions=1, schema_registry_url=schema_registry_url)
    client = SchemaRegistryClient({"url": schema_registry_url})
    v1 = client.register_schema(f"{s.input_topic}-value", Schema(json.dumps(V1), "AVRO"))
    # amount as a string cannot be read as a double; registered under a subject of its own, so no rule stops it.
    bad = {**V1, "fields": [{**f, "type": "string"} if f["name"] == "amount" else f for f in V1["fields"]]}
    unresolvable = client.register_schema(f"other-{s.input_topic}-value", Schema(json.dumps(bad), "AVRO"))
    micros = {**V1, "fields": [{**f, "type": {"type": "long", "logicalType": "timestamp-micros"}}
                               if f["name"] == "event_time" else f for f in V1["fields"]]}
    in_micros = client.register_schema(f"micros-{s.input_topic}-value", Schema(json.dumps(micros), "AVRO"))
    good = [traffic.stamp(t, int(time.time() * 1000)) for t in traffic.generated(50, seed=31, prefix="ok")]
    body = _encode(V1, good[0])
    poison = {
        b"unknown-id": (frame(987_654) + body, "unknown schema id 987654"),
        b"magic": (b"\x01" + frame(v1)[1:] + body, "magic byte 0x01"),
        b"short": (b"\x00\x00", "fewer than the 5-byte header"),
        b"plain-avro": (body, "magic byte"),
        b"unresolvable": (frame(unresolvable) + _encode(bad, good[0], amount="12.5"), "cannot be resolved"),
        b"truncated": (frame(v1) + body[:-6], "bytes missing"),
        b"micros": (frame(in_micros) + body, "field event_time is timestamp-micros there and timestamp-millis"),
    }
    records = [(t.card_id.encode(), frame(v1) + _encode(V1, t)) for t in good]
    for i, (key, (value, _)) in enumerate(poison.items()):
        records.insert(5 * (i + 1), (key, value))
    with WorkerThread(s) as w:
        _produce(s, records)
        verdicts = read_topic(s, s.verdict_topic, len(good))
        dead = read_topic(s, s.dead_letter_topic, len(poison))
        assert w.stop() == 0
    assert len(verdicts) == len(good)
    assert sorted(d.key for d in dead) == sorted(poison)
    for d in dead:
        value, reason = poison[d.key]
        assert d.value == value and d.headers["fraud.errors.stage"] == b"deserialize"
        assert reason in d.headers["fraud.errors.exception.message"].decode(), d.headers
    assert committed_offsets(s) == end_offsets(s, s.input_topic)


def test_a_hung_registry_loses_and_dead_letters_nothing(settings_for, tmp_path):
    """Records of a writer schema the worker has not fetched yet wait out a 10 s registry outage: readiness turns
    false, then every record gets its verdict, none is dead-lettered, and offsets are committed to the end."""
    port = free_ports(1)[0]
    registry = LocalRegistry(port=port, home=tmp_path / "registry")
    try:
        registry.start()
    except RegistryError as exc:
        pytest.fail(f"{exc}. This test needs the project's local registry: install Java 17+ and Maven.", pytrace=False)
    try:
        s = settings_for(partitions=2, schema_registry_url=registry.url)
        client = SchemaRegistryClient({"url": registry.url})
        subject = f"{s.input_topic}-value"
        v1 = client.register_schema(subject, Schema(json.dumps(V1), "AVRO"))
        v2 = client.register_schema(subject, Schema(json.dumps(_v2()), "AVRO"))
        now = int(time.time() * 1000)
        first = [traffic.stamp(t, now) for t in traffic.generated(100, seed=41, prefix="before")]
        later = [traffic.stamp(t, now) for t in traffic.generated(300, seed=42, prefix="during")]
        with WorkerThread(s) as w:
            _produce(s, [(t.card_id.encode(), frame(v1) + _encode(V1, t)) for t in first])
            wait_until(lambda: committed_offsets(s) == end_offsets(s, s.input_topic), 60, "the v1 records committed")
            registry.pause()
            paused_at = time.monotonic()
            _produce(s, [(t.card_id.encode(), frame(v2) + _encode(_v2(), t)) for t in later])
            wait_until(lambda: not w.worker.health.registry_reachable, 30, "readiness to say the registry is away")
            ready, state = w.worker.health.ready()
            assert ready and state["degraded"] and state["registry_reachable"] is False
            time.sleep(max(0.0, 10 - (time.monotonic() - paused_at)))
            assert sum(committed_offsets(s).values()) == len(first)
            registry.resume()
            verdicts = read_topic(s, s.verdict_topic, len(first) + len(later), timeout=120)
            wait_until(lambda: committed_offsets(s) == end_offsets(s, s.input_topic), 60, "every record committed")
            dead = read_topic(s, s.dead_letter_topic, 1, timeout=3)
            assert w.worker.health.registry_reachable
            assert w.stop() == 0
    finally:
        registry.resume()
        registry.stop()
    ids = sorted(CODEC.decode_verdict(r.value)["transaction_id"] for r in verdicts)
    assert ids == sorted(t.transaction_id for t in first + later)
    assert dead == []
