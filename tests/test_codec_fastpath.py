"""The batch codec written for our two schemas agrees with fastavro, record for record, on any input."""

from __future__ import annotations

import io
import math
import struct

import fastavro
import numpy as np
from fastavro import _read, _read_py
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.avro.codec import Codec, decision_of, validation_errors
from worker.records import Transaction, Verdict

CODEC = Codec()
doubles = st.floats(allow_nan=True, allow_infinity=True)
transactions = st.builds(
    Transaction,
    transaction_id=st.text(max_size=90),  # past 63 bytes an id takes the careful path
    card_id=st.text(max_size=90),
    amount=doubles,
    event_time=st.integers(-(2**63), 2**63 - 1),
    distance_from_home=doubles,
    distance_from_last_transaction=doubles,
    ratio_to_median_purchase_price=doubles,
    repeat_retailer=st.booleans(),
    used_chip=st.booleans(),
    used_pin_number=st.booleans(),
    online_order=st.booleans(),
)


# How many zero groups follow a varint's last one: often none (so that the others' padding is seen alone), and to well
# past ten bytes, since fastavro's readers read on without limit.
extras = st.one_of(st.just(0), st.integers(1, 12), st.integers(13, 300))
FASTAVRO_ERRORS = (EOFError, IndexError, OverflowError, ValueError, _read.ReadError)
TAIL_BYTES = 3 * 8 + 4  # the doubles and booleans after event_time


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _fastavro(value: bytes) -> dict:
    return fastavro.schemaless_reader(io.BytesIO(value), CODEC.transaction_schema, None)


def varint(n: int, extra: int = 0, junk: int | None = None) -> bytes:
    """The Avro varint of the long n followed by `extra` zero groups, with bit `junk` (past 63) set if given."""
    z = (n << 1) ^ (n >> 63)
    groups = [z >> shift & 0x7F for shift in range(0, max(z.bit_length(), 1), 7)] + [0] * extra
    if junk is not None:
        groups += [0] * (junk // 7 + 1 - len(groups))
        groups[junk // 7] |= 1 << junk % 7
    return bytes(g | 0x80 for g in groups[:-1]) + bytes(groups[-1:])


def encode_padded(txn: Transaction, forms=((0, None),) * 3) -> bytes:
    """txn in Avro with its varints (both string lengths, event_time) written as varint(value, *form)."""
    tid, cid = txn.transaction_id.encode(), txn.card_id.encode()
    tail = struct.pack("<3d4?", *(getattr(txn, name) for name in Transaction.__slots__[4:]))
    return (varint(len(tid), *forms[0]) + tid + varint(len(cid), *forms[1]) + cid + struct.pack("<d", txn.amount)
            + varint(txn.event_time, *forms[2]) + tail)


def fastavro_exact(value: bytes) -> dict | None:
    """fastavro's record if it reads exactly the value (every byte, booleans 0 or 1, longs within 64 bits), else None."""
    # The C reader (schemaless_reader) drops or wraps varint bits past 63 silently; the pure-Python one keeps them,
    # so the two agree exactly when every long fits in 64 bits.
    fo = io.BytesIO(value)
    try:
        record = fastavro.schemaless_reader(fo, CODEC.transaction_schema, None)
        reference = _read_py.schemaless_reader(io.BytesIO(value), CODEC.transaction_schema, None)
    except FASTAVRO_ERRORS:
        return None
    exact = fo.tell() == len(value) and max(value[-4:]) <= 1
    return record if exact and all(_same(record[k], reference[k]) for k in record) else None


def _records(batch) -> list[bytes]:
    """Each row's record bytes as the batch holds them."""
    return [batch.buf[s:e + TAIL_BYTES].tobytes() for s, e in zip(batch.starts.tolist(), batch.time_ends.tolist())]


@st.composite
def padded_records(draw) -> tuple[Transaction, bytes]:
    """A Transaction and its encoding with every varint followed by a random number of zero groups."""
    txn = draw(transactions)
    return txn, encode_padded(txn, [(draw(extras), None) for _ in range(3)])


@st.composite
def overflowing_records(draw) -> bytes:
    """A padded Transaction with a bit past 63 set in one of its varints."""
    forms = [(draw(extras), None) for _ in range(3)]
    forms[draw(st.integers(0, 2))] = (draw(extras), draw(st.integers(64, 64 + 7 * 20)))
    return encode_padded(draw(transactions), forms)


@settings(max_examples=150, deadline=None, database=None)
@given(st.lists(st.one_of(transactions, st.binary(max_size=80)), min_size=1, max_size=25))
def test_decode_batch_agrees_with_fastavro(items):
    """Every record fastavro decodes exactly (all bytes, 0/1 booleans) decodes to the same values, garbage or not around it."""
    values = [CODEC.encode_transaction(x) if isinstance(x, Transaction) else x for x in items]
    batch, errors = CODEC.decode_batch(values)
    assert sorted(batch.rows + list(errors)) == list(range(len(values)))
    for pos, row in enumerate(batch.rows):
        expected = _fastavro(values[row])
        got = batch.transaction(pos)
        for name, want in expected.items():
            have = getattr(got, name)
            assert _same(have, want) if isinstance(want, float) else have == want, (name, have, want)
    for row, item in enumerate(items):
        if isinstance(item, Transaction):
            assert row in batch.rows, errors.get(row)


@settings(max_examples=150, deadline=None, database=None)
@given(st.lists(transactions, min_size=1, max_size=20), st.data())
def test_encode_verdicts_agrees_with_fastavro(txns, data):
    """The batch verdict encoder writes the same bytes as fastavro writes for the equivalent Verdict."""
    batch, errors = CODEC.decode_batch([CODEC.encode_transaction(t) for t in txns])
    assert not errors
    probs = np.array(data.draw(st.lists(st.floats(0, 1), min_size=len(txns), max_size=len(txns))))
    decisions = np.array(data.draw(st.lists(st.integers(0, 2), min_size=len(txns), max_size=len(txns))))
    name, version = data.draw(st.text(max_size=70)), data.draw(st.text(max_size=10))
    encoded = CODEC.encode_verdicts(batch, probs, decisions, (0.25, 0.75), (name, version), 1_790_000_000_123)
    for pos, txn in enumerate(txns):
        decision = decision_of(int(decisions[pos]))
        verdict = Verdict(txn.transaction_id, txn.card_id, float(probs[pos]), decision.value == "DECLINE", decision,
                          0.25, 0.75, name, version, txn.event_time, 1_790_000_000_123)
        assert encoded[pos] == CODEC.encode_verdict(verdict)


@settings(max_examples=150, deadline=None, database=None)
@given(st.lists(padded_records(), min_size=1, max_size=20))
def test_padded_varints_decode_as_fastavro(records):
    """Records whose varints carry extra zero groups decode as fastavro and as the canonical record, validate alike."""
    txns, values = [t for t, _ in records], [v for _, v in records]
    assert [encode_padded(t) for t in txns] == [CODEC.encode_transaction(t) for t in txns]
    batch, errors = CODEC.decode_batch(values)
    canonical, _ = CODEC.decode_batch([CODEC.encode_transaction(t) for t in txns])
    assert not errors and batch.rows == list(range(len(values)))
    for pos, (txn, value) in enumerate(records):
        expected = fastavro_exact(value)
        assert expected is not None
        for name, want in expected.items():
            for have in (getattr(batch.transaction(pos), name), getattr(txn, name)):
                assert _same(have, want) if isinstance(want, float) else have == want, (name, have, want)
    assert {p: str(e) for p, e in validation_errors(batch).items()} == \
        {p: str(e) for p, e in validation_errors(canonical).items()}
    assert _records(batch) == _records(canonical)


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.one_of(transactions, padded_records(), overflowing_records(), st.binary(max_size=80)),
                min_size=1, max_size=25))
def test_decode_batch_accepts_exactly_what_fastavro_reads(items):
    """decode_batch accepts exactly the values fastavro reads exactly, canonical or not, and decodes them to its values."""
    values = [CODEC.encode_transaction(x) if isinstance(x, Transaction) else x[1] if isinstance(x, tuple) else x
              for x in items]
    batch, errors = CODEC.decode_batch(values)
    expected = [fastavro_exact(v) for v in values]
    assert batch.rows == [row for row, record in enumerate(expected) if record is not None], errors
    assert sorted(errors) == [row for row, record in enumerate(expected) if record is None]
    for pos, row in enumerate(batch.rows):
        got = batch.transaction(pos)
        for name, want in expected[row].items():
            have = getattr(got, name)
            assert _same(have, want) if isinstance(want, float) else have == want, (name, have, want)


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(padded_records(), min_size=1, max_size=20), st.data())
def test_verdicts_of_padded_records_are_canonical(records, data):
    """Verdicts for records with padded varints are the bytes fastavro writes, decoding to the input's ids and event time."""
    batch, errors = CODEC.decode_batch([v for _, v in records])
    assert not errors
    probs = np.array(data.draw(st.lists(st.floats(0, 1), min_size=len(records), max_size=len(records))))
    decisions = np.array(data.draw(st.lists(st.integers(0, 2), min_size=len(records), max_size=len(records))))
    encoded = CODEC.encode_verdicts(batch, probs, decisions, (0.25, 0.75), ("m", "1"), 1_790_000_000_123)
    for pos, (txn, value) in enumerate(records):
        decision = decision_of(int(decisions[pos]))
        verdict = Verdict(txn.transaction_id, txn.card_id, float(probs[pos]), decision.value == "DECLINE", decision,
                          0.25, 0.75, "m", "1", txn.event_time, 1_790_000_000_123)
        assert encoded[pos] == CODEC.encode_verdict(verdict)
        decoded, source = CODEC.decode_verdict(encoded[pos]), _fastavro(value)
        assert [decoded[k] for k in ("transaction_id", "card_id", "event_time")] == \
            [source[k] for k in ("transaction_id", "card_id", "event_time")]
