"""Property-based fuzzing of the decode path that score_batch runs: Codec.decode_transaction, then validate."""

from __future__ import annotations

import math
import time
import tracemalloc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes import CODEC, make_txn
from tests.test_codec_fastpath import encode_padded, extras, fastavro_exact
from worker.avro.codec import DecodeError, ValidationError, validate, validation_errors
from worker.records import Transaction

MAX_SECONDS = 1.0  # sanity bounds per case, far above the microseconds a decode takes
MAX_PEAK_BYTES = 4 * 1024 * 1024
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
LONG = (-(2**63), 2**63 - 1)


def zigzag(n: int) -> bytes:
    """The Avro (zig-zag varint) encoding of the long `n`."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def decode_path(value: bytes) -> Transaction | None:
    """Run decode then validate on `value` within the time and memory bounds; None when it is rejected as it should be."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        txn = CODEC.decode_transaction(value)
        assert isinstance(txn, Transaction)
        validate(txn)
        return txn
    except (DecodeError, ValidationError):
        return None
    finally:
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert elapsed < MAX_SECONDS, f"decode took {elapsed:.3f}s"
        assert peak < MAX_PEAK_BYTES, f"decode peaked at {peak} bytes"


transactions = st.builds(
    Transaction,
    transaction_id=st.text(max_size=140),
    card_id=st.text(max_size=140),
    amount=st.floats(),
    event_time=st.integers(*LONG),
    distance_from_home=st.floats(),
    distance_from_last_transaction=st.floats(),
    ratio_to_median_purchase_price=st.floats(),
    repeat_retailer=st.booleans(),
    used_chip=st.booleans(),
    used_pin_number=st.booleans(),
    online_order=st.booleans(),
)


def same(a: Transaction, b: Transaction) -> bool:
    """Field-wise equality in which NaN equals NaN."""
    return all(
        x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y))
        for x, y in ((getattr(a, f), getattr(b, f)) for f in Transaction.__slots__)
    )


def batch_path(value: bytes) -> Transaction | str:
    """What score_batch makes of `value`: decode_batch then validation_errors, giving the Transaction or the error's text."""
    batch, errors = CODEC.decode_batch([value])
    invalid = errors or validation_errors(batch)
    return str(invalid[0]) if invalid else batch.transaction(0)


@st.composite
def mutated_records(draw, padded: bool = False) -> bytes:
    """A valid encoded Transaction (varints zero-padded if `padded`) with a few random byte edits or truncations."""
    txn = draw(transactions)
    data = bytearray(encode_padded(txn, [(draw(extras), None) for _ in range(3)]) if padded
                     else CODEC.encode_transaction(txn))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "append"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "replace" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[at:]
        else:
            data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@FUZZ
@given(st.binary(max_size=1024))
def test_arbitrary_bytes(value):
    """Arbitrary bytes give a Transaction, DecodeError or ValidationError, within the time and memory bounds."""
    decode_path(value)


@FUZZ
@given(transactions)
def test_valid_records_round_trip(txn):
    """Any encoded Transaction decodes back to itself, and then validates or raises ValidationError."""
    assert same(CODEC.decode_transaction(CODEC.encode_transaction(txn)), txn)
    decode_path(CODEC.encode_transaction(txn))


@FUZZ
@given(mutated_records())
def test_mutated_records(value):
    """Valid records with bytes replaced, inserted, deleted or cut are decoded or rejected, never crash."""
    decode_path(value)


@FUZZ
@given(transactions, st.lists(extras, min_size=3, max_size=3))
def test_padded_varints_score_as_canonical(txn, padding):
    """A record whose varints carry extra zero groups is decoded and validated by the batch path as its canonical form."""
    got, want = batch_path(encode_padded(txn, [(e, None) for e in padding])), batch_path(CODEC.encode_transaction(txn))
    assert same(got, want) if isinstance(want, Transaction) else got == want


@FUZZ
@given(mutated_records(padded=True))
def test_mutated_padded_records_agree_with_fastavro(value):
    """Padded records with bytes replaced, inserted, deleted or cut decode exactly when fastavro reads them, to its values."""
    expected = fastavro_exact(value)
    try:
        txn = CODEC.decode_transaction(value)
    except DecodeError:
        assert expected is None
    else:
        assert expected is not None and same(txn, Transaction(**expected))


@FUZZ
@given(
    length=st.one_of(st.integers(2**20, 2**63 - 1), st.integers(-(2**63), -1)),
    field=st.sampled_from(["transaction_id", "card_id"]),
)
def test_huge_declared_string_lengths(length, field):
    """A string length prefix declaring gigabytes (or a negative length) is a DecodeError, without allocating it."""
    valid = CODEC.encode_transaction(make_txn(transaction_id="tx-1"))
    at = 0 if field == "transaction_id" else 5  # b"\x08tx-1" precedes card_id's length
    value = valid[:at] + zigzag(length) + valid[at + 1 :]
    assert decode_path(value) is None


@FUZZ
@given(
    n=st.integers(10, 20_000),
    filler=st.sampled_from([b"\x80", b"\xff"]),
    at=st.sampled_from([0, 12]),  # transaction_id length, event_time (after ids "tx-1", "card-1" and the amount)
)
def test_very_long_varints(n, filler, at):
    """A varint of thousands of continuation bytes where a length or the event time goes is a DecodeError."""
    valid = CODEC.encode_transaction(make_txn(transaction_id="tx-1", card_id="card-1"))
    value = valid[:at] + filler * n + b"\x01" + valid[at:]
    assert decode_path(value) is None


@FUZZ
@given(extra=st.integers(1, 4 * 1024 * 1024), pad=st.binary(min_size=1, max_size=8))
def test_oversized_messages(extra, pad):
    """A value longer than max_message_bytes, even one that starts as a valid record, is a DecodeError."""
    valid = CODEC.encode_transaction(make_txn())
    value = (valid + pad * (CODEC.max_message_bytes // len(pad) + extra))[: CODEC.max_message_bytes + extra]
    assert decode_path(value) is None
