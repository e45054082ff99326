"""Sample traffic: transactions from the synthetic generator or a card_transdata CSV, produced at a given rate."""

from __future__ import annotations

import csv
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..avro.codec import Codec
from ..kafka import send
from ..records import Transaction
from . import synth

_BOOLS = ("repeat_retailer", "used_chip", "used_pin_number", "online_order")
_FLOATS = ("distance_from_home", "distance_from_last_transaction", "ratio_to_median_purchase_price")
_CARDS = 50_000


def generated(count: int, seed: int = 0, prefix: str = "tx") -> Iterator[Transaction]:
    """`count` synthetic transactions with unique ids `<prefix>-<seed>-<n>`; event_time is set when produced."""
    chunk = 100_000
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        cols, _ = synth.generate(n, seed=seed * 1_000_003 + start)
        rows = {k: v.tolist() for k, v in cols.items()}
        for i in range(n):
            k = start + i
            yield Transaction(
                transaction_id=f"{prefix}-{seed}-{k}",
                card_id=f"card-{(k * 7919 + seed) % _CARDS:05d}",
                amount=rows["amount"][i],
                event_time=0,
                **{f: rows[f][i] for f in _FLOATS},
                **{f: bool(rows[f][i]) for f in _BOOLS},
            )


def from_csv(path: str | Path, prefix: str = "csv") -> Iterator[tuple[Transaction, int]]:
    """Rows of a card_transdata CSV as (transaction, fraud label); ids are `<prefix>-<row>`."""
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            yield (
                Transaction(
                    transaction_id=f"{prefix}-{i}",
                    card_id=f"card-{i % _CARDS:05d}",
                    amount=round(float(row["ratio_to_median_purchase_price"]) * 40.0, 2),
                    event_time=0,
                    **{f: float(row[f]) for f in _FLOATS},
                    **{f: float(row[f]) == 1.0 for f in _BOOLS},
                ),
                int(float(row.get("fraud", 0) or 0)),
            )


def stamp(txn: Transaction, now_ms: int) -> Transaction:
    """The transaction with its event time set."""
    fields = {name: getattr(txn, name) for name in Transaction.__slots__}
    fields["event_time"] = now_ms
    return Transaction(**fields)


def produce(producer, topic: str, txns: Iterable[Transaction], rate: float = 0.0, codec: Codec | None = None,
            prefix: bytes = b"") -> int:
    """Produce transactions keyed by card_id, at `rate` per second (0 = as fast as possible); return the count.

    `prefix` goes before each value (the wire-format header of a registered schema).
    """
    codec = codec or Codec()
    start = time.monotonic()
    sent = 0
    for txn in txns:
        if rate > 0 and sent % 10 == 0:
            ahead = start + sent / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        value = prefix + codec.encode_transaction(stamp(txn, int(time.time() * 1000)))
        send(producer, topic, value, txn.card_id.encode())
        producer.poll(0)
        sent += 1
    producer.flush(60)
    return sent
