"""The batch codec written for our two schemas agrees with fastavro, record for record, on any input."""

from __future__ import annotations

import io
import math

import fastavro
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.codec import Codec, decision_of
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


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _fastavro(value: bytes) -> dict:
    return fastavro.schemaless_reader(io.BytesIO(value), CODEC.transaction_schema, None)


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
