"""Hand-written fakes and factories for the unit tests of the pure core: no mocks, no broker."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from worker.avro.codec import Codec
from worker.model.manifest import Manifest
from worker.records import Envelope, Transaction

CODEC = Codec()
REVIEW, DECLINE = 0.5, 0.75


def make_txn(**overrides) -> Transaction:
    """A valid Transaction; keyword arguments replace its fields."""
    base = Transaction(
        transaction_id="tx-1",
        card_id="card-1",
        amount=0.25,
        event_time=1_700_000_000_000,
        distance_from_home=10.0,
        distance_from_last_transaction=2.5,
        ratio_to_median_purchase_price=1.5,
        repeat_retailer=True,
        used_chip=False,
        used_pin_number=True,
        online_order=False,
    )
    return dataclasses.replace(base, **overrides)


def make_message(value: bytes | None, offset: int = 0, partition: int = 0, headers=None) -> Envelope:
    """A consumed message on the `transactions` topic carrying `value`."""
    return Envelope("transactions", partition, offset, b"card-1", value, headers, 1_700_000_000_123)


def txn_message(offset: int = 0, **overrides) -> Envelope:
    """A message holding an Avro-encoded `make_txn(**overrides)`."""
    overrides.setdefault("transaction_id", f"tx-{offset}")
    return make_message(CODEC.encode_transaction(make_txn(**overrides)), offset=offset)


def make_manifest(**overrides) -> Manifest:
    """A manifest whose single feature is the raw `amount`, with thresholds REVIEW and DECLINE."""
    data = dict(
        name="fake-model",
        version="9.9.9",
        model_file="fake.onnx",
        sha256="0" * 64,
        input="x",
        output="p",
        features=[{"source": "amount", "mean": 0.0, "scale": 1.0}],
        thresholds={"review": REVIEW, "decline": DECLINE},
    )
    data.update(overrides)
    return Manifest(**data)


class FakeScorer:
    """A scorer whose probability for a row is its amount (or `probabilities[amount]`); it counts calls."""

    def __init__(self, probabilities: dict[float, float] | None = None, fail_on=(), manifest: Manifest | None = None):
        self.manifest = manifest or make_manifest()
        self.probabilities = probabilities or {}
        self.fail_on = set(fail_on)
        self.calls: list[int] = []

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        """Record the call's row count; raise if any row's amount is in `fail_on`, else return the probabilities."""
        self.calls.append(len(matrix))
        amounts = [float(a) for a in matrix[:, 0]]
        if self.fail_on.intersection(amounts):
            raise RuntimeError("fake model cannot score amount(s)\nsecond line of detail")
        return np.array([self.probabilities.get(a, a) for a in amounts], dtype=np.float64)


class SlowScorer:
    """A real scorer made slow per row: a model slower than the group's poll interval or a transaction's timeout."""

    def __init__(self, inner, seconds_per_row: float):
        self.manifest, self._inner, self._delay = inner.manifest, inner, seconds_per_row

    def predict(self, matrix):
        time.sleep(self._delay * len(matrix))
        return self._inner.predict(matrix)
