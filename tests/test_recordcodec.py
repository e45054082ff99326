"""The record codec for any input schema: compiled and fastavro paths agree, and features follow the manifest."""

from __future__ import annotations

import io
import json
from pathlib import Path

import fastavro
import numpy as np

from tests.test_bank_example import synth, train
from worker.avro.recordcodec import RecordCodec
from worker.model.manifest import Manifest

BANK = Path(__file__).resolve().parent.parent / "examples" / "bank"
SCHEMA = json.loads((BANK / "card_payment.avsc").read_text())
MANIFEST = Manifest.load(BANK / "bank-fraud.json", SCHEMA)


def _values(n: int, seed: int) -> tuple[list[dict], list[bytes]]:
    schema = fastavro.parse_schema(SCHEMA)
    records = [r for r, _ in synth.generate(n, seed=seed)]
    values = []
    for r in records:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, schema, r)
        values.append(out.getvalue())
    return records, values


def test_compiled_and_fastavro_paths_decode_the_same_records_and_refuse_the_same_values():
    """Good, truncated, extended and empty values: the compiled decoder and fastavro keep the same rows, equal."""
    _, values = _values(300, seed=5)
    values[3] = values[3][:-4]
    values[7] = values[7] + b"\x00"
    values[11] = b""
    compiled, plain = RecordCodec(BANK / "card_payment.avsc", MANIFEST), RecordCodec(BANK / "card_payment.avsc", MANIFEST)
    plain._compiled = None
    assert compiled._compiled is not None
    a, a_errors = compiled.decode_batch(values)
    b, b_errors = plain.decode_batch(values)
    assert a.rows == b.rows and a.records == b.records and sorted(a_errors) == sorted(b_errors) == [3, 7, 11]
    assert np.array_equal(a.event_times, b.event_times)


def test_features_equal_the_examples_reference():
    """The manifest's features computed by the record codec equal examples/bank/train.py's reference to 1e-6."""
    records, values = _values(500, seed=6)
    codec = RecordCodec(BANK / "card_payment.avsc", MANIFEST)
    batch, errors = codec.decode_batch(values)
    x, invalid = codec.features(batch, MANIFEST)
    assert not errors and not invalid
    reference = train.features(records, json.loads((BANK / "bank-fraud.json").read_text())["features"])
    assert np.max(np.abs(x - reference)) <= 1e-6


def test_a_schema_the_batch_decoder_does_not_compile_is_read_by_fastavro(tmp_path):
    """A schema with an array field falls back to fastavro and still decodes and scores its records."""
    schema = {**SCHEMA, "fields": SCHEMA["fields"] + [{"name": "tags", "type": {"type": "array", "items": "string"},
                                                       "default": []}]}
    path = tmp_path / "with_tags.avsc"
    path.write_text(json.dumps(schema))
    codec = RecordCodec(path, Manifest.load(BANK / "bank-fraud.json", schema))
    assert codec._compiled is None
    records = [{**r, "tags": ["a", "b"]} for r, _ in synth.generate(20, seed=7)]
    values = []
    for r in records:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, fastavro.parse_schema(schema), r)
        values.append(out.getvalue())
    batch, errors = codec.decode_batch(values)
    assert not errors and [r["payment_id"] for r in batch.records] == [r["payment_id"] for r in records]
