"""A bank's own stream: nested CardPayment records scored by the bank example's manifest alone, plain and framed."""

from __future__ import annotations

import io
import json
from pathlib import Path

import fastavro
import numpy as np
import pytest
from confluent_kafka import Producer
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

from tests.kafkatools import WorkerThread, committed_offsets, end_offsets, read_topic
from tests.test_bank_example import synth, train
from worker.avro.codec import load_schema, read_verdict
from worker.avro.recordcodec import load_input_schema
from worker.avro.registry import frame
from worker.model.scorer import OnnxScorer

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parent.parent
BANK = ROOT / "examples" / "bank"
SCHEMA_PATH = BANK / "card_payment.avsc"
SCHEMA = json.loads(SCHEMA_PATH.read_text())
MANIFEST = BANK / "bank-fraud.json"
VERDICT = load_schema("verdict")


def _encode(schema: dict, record: dict) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), record)
    return out.getvalue()


def _produce(s, records: list[tuple[bytes | None, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": s.bootstrap_servers, "enable.idempotence": True})
    for key, value in records:
        producer.produce(s.input_topic, value, key)
    assert producer.flush(30) == 0


def _worker(s, manifest: Path = MANIFEST) -> WorkerThread:
    return WorkerThread(s, scorer=OnnxScorer.load(manifest, schema=load_input_schema(s.input_schema)))


def _expected(manifest_path: Path, records: list[dict]) -> np.ndarray:
    """What onnxruntime gives for the records' features, computed by the example's reference (train.py)."""
    manifest = json.loads(manifest_path.read_text())
    return train.onnx_probabilities((BANK / manifest["model_file"]).read_bytes(),
                                    train.features(records, manifest["features"]))


def _v2() -> dict:
    """A backward-compatible evolution of CardPayment: a field added with a default, merchant moved last."""
    fields = [f for f in SCHEMA["fields"] if f["name"] != "merchant"]
    fields += [{"name": "terminal_id", "type": ["null", "string"], "default": None},
               next(f for f in SCHEMA["fields"] if f["name"] == "merchant")]
    return {**SCHEMA, "fields": fields}


def _score_all(s, records: list[dict], values: list[bytes]) -> None:
    """Run a worker over the values (one per record, keyed by card): no dead letter, and every verdict checked."""
    with _worker(s) as w:
        _produce(s, [(r["card"]["card_id"].encode(), v) for r, v in zip(records, values)])
        verdicts = read_topic(s, s.verdict_topic, len(records))
        dead = read_topic(s, s.dead_letter_topic, 1, timeout=3)
        assert w.stop() == 0
    assert dead == []
    _check(s, records, verdicts)


def _check(s, records: list[dict], verdicts) -> None:
    got = {v["transaction_id"]: v for v in (read_verdict(r.value, VERDICT) for r in verdicts)}
    assert len(got) == len(verdicts) == len(records)
    probs = np.array([got[r["payment_id"]]["fraud_probability"] for r in records])
    assert np.max(np.abs(probs - _expected(MANIFEST, records))) <= 1e-5
    first = got[records[0]["payment_id"]]
    assert first["card_id"] == records[0]["card"]["card_id"]
    assert first["event_time"] == int(records[0]["event_time"].timestamp() * 1000)
    assert first["attributes"] == {"merchant.merchant_id": records[0]["merchant"]["merchant_id"],
                                   "amount": str(records[0]["amount"]), "channel": records[0]["channel"]}
    assert committed_offsets(s) == end_offsets(s, s.input_topic)


def test_plain_bank_records_score_like_the_reference(settings_for):
    """Plain Avro CardPayment records, nested and nullable, give the probabilities of the example's reference."""
    s = settings_for(partitions=3, input_schema=SCHEMA_PATH, model_manifest=MANIFEST)
    records = [r for r, _ in synth.generate(1_500, seed=77)]
    _score_all(s, records, [_encode(SCHEMA, r) for r in records])


def test_framed_bank_records_of_two_writer_versions(settings_for, schema_registry_url):
    """v1 and an evolved v2 of CardPayment, interleaved in the wire format, each give the reference probability."""
    s = settings_for(partitions=2, input_schema=SCHEMA_PATH, model_manifest=MANIFEST,
                     schema_registry_url=schema_registry_url)
    client = SchemaRegistryClient({"url": schema_registry_url})
    subject = f"{s.input_topic}-value"
    v1 = client.register_schema(subject, Schema(json.dumps(SCHEMA), "AVRO"))
    v2 = client.register_schema(subject, Schema(json.dumps(_v2()), "AVRO"))
    records = [r for r, _ in synth.generate(1_000, seed=78)]
    values = [frame(v1) + _encode(SCHEMA, r) if i % 2 else frame(v2) + _encode(_v2(), {**r, "terminal_id": "T1"})
              for i, r in enumerate(records)]
    _score_all(s, records, values)


def test_null_in_a_feature_without_a_missing_policy_is_a_validate_dead_letter(settings_for, tmp_path):
    """With `missing` removed from card_present, a null card_present is dead-lettered naming the field; a non-null
    record, and a null in a feature that keeps its policy, still get verdicts."""
    manifest = json.loads(MANIFEST.read_text())
    manifest["model_file"] = str(BANK / manifest["model_file"])
    for f in manifest["features"]:
        if f["source"] == "card_present":
            del f["missing"]
    strict = tmp_path / "strict.json"
    strict.write_text(json.dumps(manifest))
    s = settings_for(partitions=1, input_schema=SCHEMA_PATH, model_manifest=strict)
    records = [r for r, _ in synth.generate(400, seed=79)]
    null_card = [r for r in records if r["card_present"] is None]
    with_card = [r for r in records if r["card_present"] is not None]
    assert null_card and with_card
    with _worker(s, strict) as w:
        _produce(s, [(r["card"]["card_id"].encode(), _encode(SCHEMA, r)) for r in records])
        verdicts = read_topic(s, s.verdict_topic, len(with_card))
        dead = read_topic(s, s.dead_letter_topic, len(null_card))
        assert w.stop() == 0
    assert sorted(read_verdict(r.value, VERDICT)["transaction_id"] for r in verdicts) == \
        sorted(r["payment_id"] for r in with_card)
    assert len(dead) == len(null_card)
    assert {d.headers["fraud.errors.stage"] for d in dead} == {b"validate"}
    assert {d.headers["fraud.errors.exception.message"] for d in dead} == {b"card_present is missing (null or absent)"}
