"""Tests for the Avro codec and the validation of decoded transactions."""

from __future__ import annotations

import io
import random

import fastavro
import numpy as np
import pytest

from tests.fakes import CODEC, make_txn
from tests.test_codec_fastpath import encode_padded, fastavro_exact, varint
from worker.avro.codec import Codec, DecodeError, ValidationError, validate, validation_errors
from worker.records import Decision, Transaction, Verdict

MIN_EVENT_MS, MAX_EVENT_MS = 946_684_800_000, 4_102_444_800_000  # 2000-01-01 and 2100-01-01 UTC
DOUBLES = ["amount", "distance_from_home", "distance_from_last_transaction", "ratio_to_median_purchase_price"]
VALID = CODEC.encode_transaction(make_txn())


def test_transaction_round_trip():
    """A Transaction encoded to Avro decodes back to an equal Transaction."""
    txn = make_txn(transaction_id="tx-é-42", amount=1234.5, online_order=True, used_pin_number=False)
    assert CODEC.decode_transaction(CODEC.encode_transaction(txn)) == txn


def test_verdict_round_trip():
    """A Verdict encoded to Avro decodes to a dict of the same fields, the decision as its symbol."""
    verdict = Verdict("tx-1", "card-1", 0.97, True, Decision.DECLINE, 0.5, 0.95, "fraud-mlp", "c2ced1f",
                      1_700_000_000_000, 1_700_000_000_500)
    decoded = CODEC.decode_verdict(CODEC.encode_verdict(verdict))
    assert decoded == {name: getattr(verdict, name) for name in Verdict.__slots__} | {"decision": "DECLINE"}


@pytest.mark.parametrize("value", [None, b""], ids=["none", "empty"])
def test_empty_value_is_decode_error(value):
    """A missing or empty message value is a DecodeError."""
    with pytest.raises(DecodeError, match="empty"):
        CODEC.decode_transaction(value)


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_are_decode_error(seed):
    """Random bytes of random length are a DecodeError."""
    rng = random.Random(seed)
    with pytest.raises(DecodeError):
        CODEC.decode_transaction(rng.randbytes(rng.randint(1, 200)))


@pytest.mark.parametrize("cut", range(len(VALID)))
def test_every_truncation_is_decode_error(cut):
    """A valid record cut short at any byte position is a DecodeError."""
    with pytest.raises(DecodeError):
        CODEC.decode_transaction(VALID[:cut])


def test_trailing_bytes_are_decode_error():
    """A valid record followed by extra bytes is a DecodeError that counts them."""
    with pytest.raises(DecodeError, match="3 trailing bytes"):
        CODEC.decode_transaction(VALID + b"\x00\x02\x04")


@pytest.mark.parametrize("byte", [2, 0x80, 0xFF])
def test_boolean_byte_other_than_0_or_1_is_decode_error(byte):
    """A boolean field holding a byte other than 0 or 1 (read as true by some decoders, false by others) is a DecodeError."""
    assert VALID[-1] == 0  # online_order, the schema's last field, is false in VALID
    with pytest.raises(DecodeError, match="online_order"):
        CODEC.decode_transaction(VALID[:-1] + bytes([byte]))


def test_verdict_record_is_not_a_transaction():
    """A valid Avro Verdict (a different schema) read as a Transaction is a DecodeError."""
    verdict = Verdict("tx-1", "card-1", 0.1, False, Decision.APPROVE, 0.5, 0.95, "m", "1", 1_700_000_000_000, 0)
    with pytest.raises(DecodeError):
        CODEC.decode_transaction(CODEC.encode_verdict(verdict))


def test_record_of_other_schema_is_decode_error():
    """A valid Avro record of an unrelated schema is a DecodeError."""
    schema = fastavro.parse_schema({"type": "record", "name": "User", "fields": [
        {"name": "name", "type": "string"}, {"name": "tags", "type": {"type": "array", "items": "string"}}]})
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, {"name": "alice", "tags": ["a", "b", "c"]})
    with pytest.raises(DecodeError):
        CODEC.decode_transaction(buf.getvalue())


def test_value_above_max_message_bytes_is_decode_error():
    """A value longer than max_message_bytes is a DecodeError, though the same bytes decode under a larger limit."""
    value = CODEC.encode_transaction(make_txn(transaction_id="t" * 100))
    assert len(value) > 64
    assert Codec(max_message_bytes=len(value)).decode_transaction(value).transaction_id == "t" * 100
    with pytest.raises(DecodeError, match="exceeds max_message_bytes=64"):
        Codec(max_message_bytes=64).decode_transaction(value)


def test_validate_accepts_a_good_transaction_and_the_limits():
    """validate accepts (returns None for) ordinary values, zero doubles, 128-character ids and both ends of the event time range."""
    assert validate(make_txn()) is None
    assert validate(make_txn(**{name: 0.0 for name in DOUBLES})) is None
    assert validate(make_txn(transaction_id="t" * 128, card_id="c" * 128, event_time=MIN_EVENT_MS)) is None
    assert validate(make_txn(event_time=MAX_EVENT_MS - 1)) is None


@pytest.mark.parametrize("name", DOUBLES)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), -0.01])
def test_validate_rejects_bad_doubles(name, value):
    """validate rejects NaN, infinite and negative values of every double field, naming the field."""
    with pytest.raises(ValidationError, match=name):
        validate(make_txn(**{name: value}))


@pytest.mark.parametrize("name", ["transaction_id", "card_id"])
@pytest.mark.parametrize("value", ["", "x" * 129], ids=["empty", "129-chars"])
def test_validate_rejects_bad_ids(name, value):
    """validate rejects empty and oversized ids, naming the field."""
    with pytest.raises(ValidationError, match=name):
        validate(make_txn(**{name: value}))


@pytest.mark.parametrize("event_time", [MIN_EVENT_MS - 1, MAX_EVENT_MS, 0, -1, 2**62])
def test_validate_rejects_event_time_outside_2000_2100(event_time):
    """validate rejects event times before 2000 or from 2100 on."""
    with pytest.raises(ValidationError, match="event_time"):
        validate(make_txn(event_time=event_time))


@pytest.mark.parametrize("field", ["transaction_id", "card_id"])
def test_empty_id_with_padded_length_is_validation_error(field):
    """An empty id whose length is written `80 80 00` decodes as fastavro reads it, "", and then fails validation."""
    value = encode_padded(make_txn(**{field: ""}), [(2, None) if f == field else (0, None) for f in
                                                    ("transaction_id", "card_id", "event_time")])
    assert b"\x80\x80\x00" in value and fastavro_exact(value)[field] == ""
    batch, errors = CODEC.decode_batch([value])
    assert not errors and getattr(batch.transaction(0), field) == ""
    invalid = validation_errors(batch)
    assert list(invalid) == [0] and isinstance(invalid[0], ValidationError) and field in str(invalid[0])


@pytest.mark.parametrize("field", ["transaction_id", "card_id"])
@pytest.mark.parametrize("size", [1, 63, 64, 128, 129, 8192])
@pytest.mark.parametrize("extra", [0, 1, 12])
def test_ids_validate_by_decoded_length_however_it_is_written(field, size, extra):
    """An id passes validation exactly when it holds 1..128 bytes, whatever the form of its length (e.g. 128 as 80 82 00)."""
    txn = make_txn(**{field: "i" * size})
    value = encode_padded(txn, [(extra, None) if f == field else (0, None) for f in
                                ("transaction_id", "card_id", "event_time")])
    batch, errors = CODEC.decode_batch([value])
    assert not errors and batch.transaction(0) == txn == Transaction(**fastavro_exact(value))
    assert bool(validation_errors(batch)) == (size > 128)


def test_128_byte_id_with_three_byte_length_is_accepted():
    """A 128-byte transaction_id whose length is written in three bytes decodes to fastavro's value and validates."""
    txn = make_txn(transaction_id="t" * 128)
    value = encode_padded(txn, [(1, None), (0, None), (0, None)])
    assert value[:3] == b"\x80\x82\x00"
    batch, errors = CODEC.decode_batch([value])
    assert not errors and not validation_errors(batch)
    assert batch.transaction(0) == txn == Transaction(**fastavro_exact(value))


@pytest.mark.parametrize("extra", [1, 9, 10, 50, 1000])
def test_zero_padded_varints_of_any_length_decode_as_fastavro(extra):
    """Varints followed by any number of zero groups, which fastavro reads without limit, decode to the same values."""
    txn = make_txn()
    value = encode_padded(txn, [(extra, None)] * 3)
    assert CODEC.decode_transaction(value) == txn == Transaction(**fastavro_exact(value))


@pytest.mark.parametrize("field", ["transaction_id", "card_id", "event_time"])
@pytest.mark.parametrize("extra, junk", [(0, 64), (0, 69), (1, 70), (20, 100), (200, 1000)])
def test_varint_bits_past_63_are_decode_error(field, extra, junk):
    """A varint with a bit past 63, which fastavro's C reader drops or wraps around silently, is a DecodeError."""
    fields = ("transaction_id", "card_id", "event_time")
    value = encode_padded(make_txn(), [(extra, junk) if f == field else (0, None) for f in fields])
    assert fastavro_exact(value) is None
    with pytest.raises(DecodeError, match=f"{field} does not fit in a 64-bit long"):
        CODEC.decode_transaction(value)


def test_fastavro_c_reader_accepts_a_varint_with_bits_past_63():
    """fastavro's C reader reads a transaction_id length of 2**64 as 0 and the record as valid; we reject it."""
    value = varint(0, junk=64) + VALID[5:]
    assert value[:10] == b"\x80" * 9 + b"\x02"
    fo = io.BytesIO(value)
    assert fastavro.schemaless_reader(fo, CODEC.transaction_schema, None)["transaction_id"] == ""
    assert fo.tell() == len(value)
    with pytest.raises(DecodeError, match="transaction_id does not fit in a 64-bit long"):
        CODEC.decode_transaction(value)


def test_verdict_of_padded_input_is_canonical():
    """The verdict for an input with padded varints is the canonical Avro fastavro writes, with the input's values."""
    txn = make_txn(transaction_id="t" * 128)
    value = encode_padded(txn, [(2, None), (1, None), (3, None)])
    batch, errors = CODEC.decode_batch([value])
    assert not errors
    [encoded] = CODEC.encode_verdicts(batch, np.array([0.9]), np.array([2]), (0.5, 0.75), ("m", "1"), 1_790_000_000_000)
    verdict = Verdict(txn.transaction_id, txn.card_id, 0.9, True, Decision.DECLINE, 0.5, 0.75, "m", "1",
                      txn.event_time, 1_790_000_000_000)
    assert encoded == CODEC.encode_verdict(verdict)
    source, decoded = fastavro_exact(value), CODEC.decode_verdict(encoded)
    assert all(decoded[k] == source[k] for k in ("transaction_id", "card_id", "event_time"))
