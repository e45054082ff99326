"""Decode cost per record of the schema-compiled batch decoder (worker/avrobatch.py) against fastavro, same data.

    .venv/bin/python bench/avrobatch.py            # µs/record, best of 20 rounds over 1000 records, per schema

Schemas: the flat schemas/transaction.avsc (records from worker.traffic when it can make them, else random ones)
and the nested examples/bank/card_payment.avsc with records from examples/bank/synth.py.
"""

from __future__ import annotations

import importlib.util
import io
import json
import random
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import fastavro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.avrobatch import BatchDecoder  # noqa: E402

N, ROUNDS = 1000, 20


def best_us(fn) -> float:
    """Best time of fn over ROUNDS, in µs per record."""
    best = float("inf")
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / N * 1e6


def transactions(n: int, seed: int = 0) -> list[dict]:
    """Random records of schemas/transaction.avsc."""
    rnd = random.Random(seed)
    start = datetime(2025, 3, 3, tzinfo=timezone.utc)
    return [{"transaction_id": f"txn-{rnd.getrandbits(64):016x}", "card_id": f"card-{rnd.randrange(50_000):06d}",
             "amount": round(rnd.lognormvariate(3.5, 1.0), 2),
             "event_time": start + timedelta(milliseconds=rnd.randrange(28 * 86_400_000)),
             "distance_from_home": rnd.expovariate(1 / 20), "distance_from_last_transaction": rnd.expovariate(1 / 5),
             "ratio_to_median_purchase_price": rnd.lognormvariate(0, 0.7), "repeat_retailer": rnd.random() < 0.8,
             "used_chip": rnd.random() < 0.6, "used_pin_number": rnd.random() < 0.3, "online_order": rnd.random() < 0.5}
            for _ in range(n)]


def bank_payments(n: int, seed: int = 0) -> list[dict]:
    """Records of examples/bank/card_payment.avsc from the bank example's generator."""
    spec = importlib.util.spec_from_file_location("bank_synth", ROOT / "examples" / "bank" / "synth.py")
    synth = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(synth)
    return [record for record, _ in synth.generate(n, seed)]


def run(name: str, schema: dict, records: list[dict]) -> dict[str, float]:
    parsed = fastavro.parse_schema(schema)
    values = []
    for record in records:
        fo = io.BytesIO()
        fastavro.schemaless_writer(fo, parsed, record)
        values.append(fo.getvalue())
    decoder = BatchDecoder(schema)
    expected = [fastavro.schemaless_reader(io.BytesIO(v), parsed, None) for v in values]
    got, errors = decoder.decode(values)
    assert not errors and got == expected, "the batch decoder disagrees with fastavro"
    times = {
        "fastavro.schemaless_reader": best_us(lambda: [fastavro.schemaless_reader(io.BytesIO(v), parsed, None)
                                                       for v in values]),
        "BatchDecoder.decode": best_us(lambda: decoder.decode(values)),
        "BatchDecoder.columns": best_us(lambda: decoder.columns(values)),
    }
    size = sum(map(len, values)) / len(values)
    print(f"{name}: {N} records of {size:.0f} bytes on average, best of {ROUNDS}")
    base = times["fastavro.schemaless_reader"]
    for label, us in times.items():
        print(f"  {label:28s} {us:6.2f} µs/record  ({base / us:4.1f}x fastavro)")
    return times


def main() -> None:
    run("transaction.avsc (flat)", json.loads((ROOT / "schemas" / "transaction.avsc").read_text()), transactions(N))
    run("card_payment.avsc (nested)", json.loads((ROOT / "examples" / "bank" / "card_payment.avsc").read_text()),
        bank_payments(N))


if __name__ == "__main__":
    main()
