"""Decode cost per record, same data, same run: the hand-compiled codec of our schema, the schema-compiled
BatchDecoder (worker/avro/avrobatch.py), the record codec built on it, and plain fastavro.

    .venv/bin/python bench/decode.py            # µs/record (best of ROUNDS) and the ratio to fastavro
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
from worker.tools import traffic  # noqa: E402
from worker.avro.avrobatch import BatchDecoder  # noqa: E402
from worker.avro.codec import Codec  # noqa: E402
from worker.avro.recordcodec import RecordCodec  # noqa: E402
from worker.model.manifest import Manifest  # noqa: E402

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


def encoded(schema: dict, records: list[dict]) -> list[bytes]:
    """The records in Avro binary, written by fastavro."""
    parsed, out = fastavro.parse_schema(schema), []
    for record in records:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, record)
        out.append(buf.getvalue())
    return out


def compare(title: str, schema: dict, values: list[bytes], extra: dict) -> None:
    """Print each path's µs/record and its speed against fastavro; check the BatchDecoder agrees with it first."""
    parsed, decoder = fastavro.parse_schema(schema), BatchDecoder(schema)
    assert decoder.decode(values)[0] == [fastavro.schemaless_reader(io.BytesIO(v), parsed, None) for v in values]
    rows = {"fastavro schemaless_reader": best_us(lambda: [fastavro.schemaless_reader(io.BytesIO(v), parsed, None)
                                                           for v in values]),
            "BatchDecoder.decode (dicts)": best_us(lambda: decoder.decode(values)),
            "BatchDecoder.columns (numpy)": best_us(lambda: decoder.columns(values)),
            **{name: best_us(fn) for name, fn in extra.items()}}
    print(f"{title}: {N} records of {sum(map(len, values)) / N:.0f} bytes, best of {ROUNDS}")
    base = rows["fastavro schemaless_reader"]
    for name, us in rows.items():
        print(f"  {name:38s} {us:6.2f} µs/record  ({base / us:4.1f}x fastavro)")


def main() -> None:
    codec = Codec()
    plain = [codec.encode_transaction(traffic.stamp(t, 1_790_000_000_000)) for t in traffic.generated(N, seed=1)]
    compare("schemas/transaction.avsc", codec.transaction_avsc, plain,
            {"our codec decode_batch": lambda: codec.decode_batch(plain)})
    schema = json.loads((BANK / "card_payment.avsc").read_text())
    manifest = Manifest.load(BANK / "bank-fraud.json", schema)
    bank = RecordCodec(BANK / "card_payment.avsc", manifest)
    nested = encoded(schema, [r for r, _ in synth.generate(N, seed=2)])
    compare("examples/bank/card_payment.avsc", schema, nested,
            {"record codec decode_batch": lambda: bank.decode_batch(nested),
             "record codec decode_batch + features": lambda: bank.features(bank.decode_batch(nested)[0], manifest)})


if __name__ == "__main__":
    main()
