"""Batch size never changes a result: one at a time, in small batches and in one large batch, every record gets the
same verdict bytes or the same dead letter, through the row-by-row path for small batches and the vectorised one."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import random
import struct
from pathlib import Path

import fastavro
import numpy as np
import pytest

import worker.avro.codec as codec_module
import worker.avro.recordcodec as recordcodec_module
import worker.scoring as scoring_module
from examples.bank import synth
from tests.fakes import CODEC, FakeScorer, make_manifest, make_message, make_txn
from tests.test_codec_fastpath import encode_padded, varint
from worker.avro.avrobatch import BatchDecoder
from worker.avro.codec import SMALL_BATCH, Codec
from worker.avro.recordcodec import SMALL_BATCH as FEW_RECORDS
from worker.avro.recordcodec import RecordCodec
from worker.model.manifest import Manifest
from worker.model.scorer import OnnxScorer
from worker.records import Transaction
from worker.scoring import score_batch
from worker.tools import traffic

ROOT = Path(__file__).resolve().parent.parent
BANK = ROOT / "examples" / "bank"
BANK_SCHEMA = json.loads((BANK / "card_payment.avsc").read_text())
NOW = 1_790_000_000_000
# Below, at and above the thresholds of the row-by-row paths.
SIZES = (1, 2, 3, 5, 8, FEW_RECORDS, FEW_RECORDS + 1, SMALL_BATCH, SMALL_BATCH + 1, 40)


def raw_record(tid: bytes, cid: bytes, amount: float = 12.5, event_time: int = NOW, doubles=(1.0, 2.0, 3.0),
               flags: bytes = b"\x00\x01\x00\x01") -> bytes:
    """A Transaction in Avro from raw id bytes (any bytes, UTF-8 or not), canonical varints."""
    return (varint(len(tid)) + tid + varint(len(cid)) + cid + struct.pack("<d", amount) + varint(event_time)
            + struct.pack("<3d", *doubles) + flags)


def hostile_transactions() -> list[bytes | None]:
    """Good records and every kind of bad one the codec must refuse or dead-letter."""
    good = [CODEC.encode_transaction(traffic.stamp(t, NOW)) for t in traffic.generated(120, seed=3)]
    valid = good[0]
    out: list[bytes | None] = [*good, None, b"", b"\x00", valid + b"\x00", valid + b"\x01\x02\x03",
                               b"x" * (CODEC.max_message_bytes + 1), valid + b"\x00" * CODEC.max_message_bytes]
    out += [valid[:cut] for cut in range(0, len(valid), 3)]
    for size in (0, 1, 63, 64, 100, 128, 129, 300):
        out += [raw_record(b"t" * size, b"card-1"), raw_record(b"tx-1", b"c" * size)]
    out += [raw_record("é".encode() * 40, b"card-1"), raw_record(b"tx-\xff", b"card-1"), raw_record(b"tx-1", b"\xc3"),
            raw_record(b"\x80" * 70, b"card-1"), raw_record(b"tx-1", b"card-\xed\xa0\x80")]
    for bad in (math.nan, math.inf, -math.inf, -1.0, -0.0, -1e-300, 5e-324, 1e308):
        out.append(CODEC.encode_transaction(make_txn(amount=bad)))
        for k in range(3):
            doubles = [1.0, 2.0, 3.0]
            doubles[k] = bad
            out.append(raw_record(b"tx-2", b"card-2", doubles=tuple(doubles)))
    for when in (0, -1, 946_684_799_999, 946_684_800_000, 4_102_444_799_999, 4_102_444_800_000, 2**62, -(2**63),
                 2**63 - 1):
        out.append(CODEC.encode_transaction(make_txn(event_time=when)))
    for k in range(4):
        for byte in (2, 0x80, 0xFF):
            flags = bytearray(b"\x01\x00\x01\x00")
            flags[k] = byte
            out.append(raw_record(b"tx-3", b"card-3", flags=bytes(flags)))
    out.append(raw_record(b"tx-\xff", b"card-3", flags=b"\x02\x00\x00\x00"))  # two faults: the ids are read first
    txn = make_txn(transaction_id="tx-4")
    for extra in (1, 5, 9, 12):
        for field in range(3):
            forms = [(0, None)] * 3
            forms[field] = (extra, None)
            out.append(encode_padded(txn, forms))
        out.append(encode_padded(dataclasses.replace(txn, transaction_id="p" * 70), [(extra, None)] * 3))
    for field in range(3):
        forms = [(0, None)] * 3
        forms[field] = (2, 64 + 7 * field)  # a bit past 63: not a 64-bit long
        out.append(encode_padded(txn, forms))
    out.append(valid[:-28] + b"\x80" * 12 + b"\x01" + valid[-28:])  # event_time cut into a too-long varint
    rng = random.Random(7)
    out += [rng.randbytes(rng.randint(1, 90)) for _ in range(30)]
    for _ in range(60):  # one byte of a good record changed
        value = bytearray(rng.choice(good))
        value[rng.randrange(len(value))] = rng.choice([0x00, 0x01, 0x02, 0x7F, 0x80, 0xFF])
        out.append(bytes(value))
    rng.shuffle(out)
    return out


def bank_values() -> list[bytes | None]:
    """Bank card payments: good ones, ones the manifest refuses, and damaged bytes of every kind."""
    schema = fastavro.parse_schema(BANK_SCHEMA)

    def encode(record: dict) -> bytes:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, schema, record)
        return out.getvalue()

    records = [r for r, _ in synth.generate(80, seed=11)]
    good = [encode(r) for r in records]
    out: list[bytes | None] = [*good, None, b"", good[0] + b"\x00", b"x" * 70_000]
    base = records[0]
    for size in (0, 1, 64, 128, 129):
        out.append(encode({**base, "payment_id": "p" * size}))
        out.append(encode({**base, "card": {**base["card"], "card_id": "c" * size}}))
    out += [encode({**base, "payment_id": "é" * 70}), encode({**base, "customer_distance_km": None}),
            encode({**base, "card_present": None}), encode({**base, "customer_distance_km": math.nan}),
            encode({**base, "customer_distance_km": -math.inf})]
    rng = random.Random(5)
    for value in good[:12]:
        out += [value[:cut] for cut in sorted(rng.sample(range(len(value)), 4))]
        for _ in range(12):  # a byte replaced: bad booleans, union branches, enum indexes, UTF-8, lengths ...
            damaged = bytearray(value)
            damaged[rng.randrange(len(value))] = rng.choice([0x01, 0x02, 0x03, 0x7F, 0x80, 0xC3, 0xFF])
            out.append(bytes(damaged))
        at = rng.randrange(len(value))  # a zero group inserted: sometimes a padded varint, read as the same number
        out.append(value[:at] + b"\x80" + value[at:])
    out += [rng.randbytes(rng.randint(1, 60)) for _ in range(20)]
    rng.shuffle(out)
    return out


def results(values: list[bytes | None], scorer, codec, sizes) -> dict[int, tuple]:
    """Each value's result (verdict bytes and typed verdict, or dead letter) when scored in batches of the sizes."""
    messages = [make_message(v, offset=i) for i, v in enumerate(values)]
    out: dict[int, tuple] = {}
    at, k = 0, 0
    while at < len(messages):
        batch = messages[at:at + sizes[k % len(sizes)]]
        at, k = at + len(batch), k + 1
        outcome = score_batch(batch, scorer, codec, NOW)
        assert outcome.decisions is None or outcome.decisions.dtype == np.int64
        for (message, verdict), encoded, decision, when in zip(outcome.verdicts, outcome.encoded,
                                                               outcome.decisions if outcome.scored else [],
                                                               outcome.event_times if outcome.scored else []):
            assert message.offset() not in out
            if isinstance(codec, Codec):  # canonical Avro, whatever the input's varints
                assert encoded == codec.encode_verdict(verdict)
            out[message.offset()] = ("verdict", encoded, verdict, int(decision), int(when))
        for dl in outcome.dead_letters:
            assert dl.message.offset() not in out
            out[dl.message.offset()] = (dl.stage, dl.error_class, dl.error_message)
    assert sorted(out) == list(range(len(values)))
    return out


class Spy:
    """Counts the calls of a function while installed with monkeypatch."""

    def __init__(self, monkeypatch, owner, name: str):
        self.calls = 0
        inner = getattr(owner, name)

        def spy(*args, **kwargs):
            self.calls += 1
            return inner(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)


def vectorised_only(monkeypatch) -> None:
    """Turn the row-by-row path for small batches off everywhere it is used."""
    for module in (codec_module, recordcodec_module, scoring_module):
        monkeypatch.setattr(module, "SMALL_BATCH", -1)


class SumScorer:
    """A fake model whose probability depends on every bit of every feature; amounts of 7 fail, 6 give NaN."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        if (matrix[:, 0] == 7.0).any():
            raise RuntimeError("cannot score 7\nmore")
        probs = np.modf(np.abs(matrix.astype(np.float64)).sum(axis=1) * 1e-3 + 0.123)[0]
        probs[matrix[:, 0] == 6.0] = np.nan
        return probs


def scorers() -> dict[str, object]:
    """The reference model and fakes for manifests with and without transforms and standardisation."""
    raw = [{"source": s, "mean": 0.0, "scale": 1.0} for s in ("amount", "used_chip", "distance_from_home",
                                                                "event_time")]
    scaled = [{**f, "mean": 1.5, "scale": 3.0} for f in raw]
    shaped = [{"source": "amount", "mean": -0.0, "scale": 1.0},
              {"source": "distance_from_home", "transform": "log1p", "clip": [0.0, 4.0], "mean": 0.5, "scale": 2.0},
              {"source": "event_time", "transform": "hour_of_day", "mean": 12.0, "scale": 7.0}]
    return {"reference": OnnxScorer.load(ROOT / "models" / "fraud-gbt.json"),
            "raw": SumScorer(make_manifest(features=raw)), "scaled": SumScorer(make_manifest(features=scaled)),
            "shaped": SumScorer(make_manifest(features=shaped)),
            "amounts": FakeScorer({0.25: 0.9, 12.5: 1.5, 3.0: -0.5, 4.0: math.nan, 0.125: 1.0, 0.375: 0.0},
                                  fail_on=[5.0])}


TRANSACTIONS = hostile_transactions() + [CODEC.encode_transaction(make_txn(amount=a, transaction_id=f"a-{a}"))
                                         for a in (0.25, 12.5, 3.0, 4.0, 5.0, 6.0, 7.0, 0.75, 0.5, 0.125, 0.375)]


@pytest.mark.parametrize("name", ["reference", "raw", "scaled", "shaped", "amounts"])
def test_transactions_score_alike_in_batches_of_any_size_and_by_both_paths(name, monkeypatch):
    """Default Codec: every record's verdict bytes or dead letter is the same one at a time, in small batches, in one
    large batch, and one at a time with the row-by-row path turned off."""
    scorer = scorers()[name]
    row_by_row, vectorised = Spy(monkeypatch, codec_module, "_plainly_valid"), Spy(monkeypatch, codec_module,
                                                                                     "_non_ascii_ids")
    alone = results(TRANSACTIONS, scorer, CODEC, [1])
    assert row_by_row.calls > 0 and vectorised.calls == 0
    assert results(TRANSACTIONS, scorer, CODEC, SIZES) == alone
    assert vectorised.calls > 0
    assert results(TRANSACTIONS, scorer, CODEC, [len(TRANSACTIONS)]) == alone
    kinds = {r[0] for r in alone.values()}
    assert {"verdict", "deserialize", "validate"} <= kinds, kinds
    if name == "amounts":
        assert "score" in kinds
    vectorised_only(monkeypatch)
    before = row_by_row.calls
    assert results(TRANSACTIONS, scorer, Codec(), [1]) == alone
    assert row_by_row.calls == before


def test_every_hostile_kind_is_seen():
    """The inputs above reach each way a record can fail, so the comparisons cover them all."""
    alone = results(TRANSACTIONS, scorers()["amounts"], CODEC, [1])
    messages = " | ".join(r[2] for r in alone.values() if r[0] != "verdict")
    for part in ("empty message value", "exceeds max_message_bytes", "trailing bytes", "bytes missing", "truncated",
                 "is not UTF-8", "not an Avro boolean", "does not fit in a 64-bit long", "must hold 1..128 bytes",
                 "is not finite", "is negative", "is outside 2000..2100", "not a probability", "cannot score"):
        assert part in messages, part
    padded = [r for i, r in alone.items() if TRANSACTIONS[i] is not None and b"p" * 70 in TRANSACTIONS[i]]
    assert padded and all(r[0] == "verdict" for r in padded)


def test_bank_records_score_alike_in_batches_of_any_size_and_by_both_paths(monkeypatch):
    """RecordCodec with the bank example: the same, with fastavro reading small batches and the batch decoder the
    rest (and anything fastavro does not write back byte for byte)."""
    scorer = OnnxScorer.load(BANK / "bank-fraud.json", schema=BANK_SCHEMA)
    codec = RecordCodec(BANK / "card_payment.avsc", scorer.manifest)
    values = bank_values()
    fastavro_path = Spy(monkeypatch, RecordCodec, "_read_canonical")
    compiled = Spy(monkeypatch, BatchDecoder, "decode")
    alone = results(values, scorer, codec, [1])
    readable = sum(1 for v in values if v and len(v) <= codec.max_message_bytes)
    assert fastavro_path.calls == readable and compiled.calls > 0
    assert results(values, scorer, codec, SIZES) == alone
    calls = fastavro_path.calls
    assert results(values, scorer, codec, [len(values)]) == alone
    assert fastavro_path.calls == calls
    kinds = {r[0] for r in alone.values()}
    assert {"verdict", "deserialize", "validate"} <= kinds, kinds
    messages = " | ".join(r[2] for r in alone.values() if r[0] != "verdict")
    for part in ("empty message value", "exceeds max_message_bytes", "trailing bytes", "truncated",
                 "must hold 1..128 bytes", "non-finite"):
        assert part in messages, part
    vectorised_only(monkeypatch)
    assert results(values, scorer, RecordCodec(BANK / "card_payment.avsc", scorer.manifest), [1]) == alone
    assert fastavro_path.calls == calls


def test_typed_transactions_match_their_encoding():
    """TransactionBatch.of and the row-by-row decode give the typed transactions back as they were."""
    txns = [make_txn(transaction_id=f"t-{i}", amount=float(i), online_order=bool(i % 2))
            for i in range(SMALL_BATCH + 3)]
    for n in (1, SMALL_BATCH, SMALL_BATCH + 1):
        batch = codec_module.TransactionBatch.of(txns[:n])
        assert [batch.transaction(i) for i in range(n)] == txns[:n]
        assert isinstance(batch.transaction(0), Transaction)


@pytest.mark.parametrize("mean, scale", [(0.0, 1.0), (1.5, 3.0), (-0.0, 1.0), (0.0, 0.5)])
@pytest.mark.parametrize("n", [1, SMALL_BATCH, SMALL_BATCH + 1])
def test_features_are_the_standardised_fields(mean, scale, n):
    """Raw-number features, row by row or by columns, are (value - mean) / scale in float64, then float32."""
    sources = ("amount", "used_chip", "distance_from_home", "event_time", "online_order")
    manifest = make_manifest(features=[{"source": s, "mean": mean, "scale": scale} for s in sources])
    txns = [make_txn(amount=0.1 * i + 1e-9, used_chip=bool(i % 2), distance_from_home=0.0, online_order=i % 3 == 0,
                     event_time=1_700_000_000_001 + 977 * i) for i in range(n)]
    x = np.array([[float(getattr(t, s)) for s in sources] for t in txns], dtype=np.float64)
    expected = ((x - mean) / scale).astype(np.float32)
    got, invalid = CODEC.features(codec_module.TransactionBatch.of(txns), manifest)
    assert not invalid and got.dtype == np.float32 and got.shape == expected.shape
    assert got.tobytes() == expected.tobytes()
