"""Decode cost per record: the compiled batch codec and the record codec against plain fastavro, same data, same run.

    .venv/bin/python bench/decode.py            # prints µs/record (best of several rounds) and ratios
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import fastavro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.bank import synth  # noqa: E402
from worker import traffic  # noqa: E402
from worker.codec import Codec  # noqa: E402
from worker.manifest import Manifest  # noqa: E402
from worker.recordcodec import RecordCodec  # noqa: E402

N, ROUNDS = 1000, 30
BANK = ROOT / "examples" / "bank"


def best_us(fn) -> float:
    """Best time of `fn` over ROUNDS, in µs per record."""
    best = float("inf")
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / N * 1e6


def fastavro_each(values: list[bytes], schema: dict) -> None:
    for v in values:
        fastavro.schemaless_reader(io.BytesIO(v), schema, None)


def main() -> None:
    codec = Codec()
    txns = [traffic.stamp(t, 1_790_000_000_000) for t in traffic.generated(N, seed=1)]
    plain = [codec.encode_transaction(t) for t in txns]
    manifest = Manifest.load(BANK / "bank-fraud.json", json.loads((BANK / "card_payment.avsc").read_text()))
    bank = RecordCodec(BANK / "card_payment.avsc", manifest)
    nested = []
    for record, _ in synth.generate(N, seed=2):
        out = io.BytesIO()
        fastavro.schemaless_writer(out, bank.reader, record)
        nested.append(out.getvalue())
    rows = {
        "default schema: batch codec decode_batch": best_us(lambda: codec.decode_batch(plain)),
        "default schema: fastavro schemaless_reader": best_us(lambda: fastavro_each(plain, codec.transaction_schema)),
        "nested bank schema: record codec decode_batch": best_us(lambda: bank.decode_batch(nested)),
        "nested bank schema: record codec decode + features": best_us(
            lambda: bank.features(bank.decode_batch(nested)[0], manifest)),
        "nested bank schema: fastavro schemaless_reader": best_us(lambda: fastavro_each(nested, bank.reader)),
    }
    width = max(map(len, rows))
    for name, us in rows.items():
        print(f"{name.ljust(width)}  {us:7.2f} µs/record")
    base = rows["default schema: fastavro schemaless_reader"]
    print(f"batch codec / fastavro on the default schema: {rows['default schema: batch codec decode_batch'] / base:.3f}")


if __name__ == "__main__":
    main()
