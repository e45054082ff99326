"""Avro encoding of transactions and verdicts with fastavro; every decode failure is one DecodeError."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import fastavro

from .records import Transaction, Verdict

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
_DOUBLES = ("amount", "distance_from_home", "distance_from_last_transaction", "ratio_to_median_purchase_price")
# Event times outside 2000-01-01 .. 2100-01-01 are data errors, not payments.
_MIN_EVENT_MS, _MAX_EVENT_MS = 946_684_800_000, 4_102_444_800_000
_MAX_ID_CHARS = 128


class DecodeError(ValueError):
    """The bytes are not a Transaction in our schema."""


class ValidationError(ValueError):
    """A decoded Transaction holds values that cannot be scored."""


def load_schema(name: str, schema_dir: Path = SCHEMA_DIR, booleans_as_bytes: bool = False) -> dict:
    """Parse schemas/<name>.avsc, keeping timestamps as plain epoch-millisecond longs."""
    raw = json.loads((schema_dir / f"{name}.avsc").read_text())
    for f in raw["fields"]:
        if isinstance(f["type"], dict) and f["type"].get("logicalType") == "timestamp-millis":
            f["type"] = "long"
        elif booleans_as_bytes and f["type"] == "boolean":
            f["type"] = {"type": "fixed", "name": f"{f['name']}_byte", "size": 1}
    return fastavro.parse_schema(raw)


class Codec:
    """Reads transactions and writes verdicts in Avro binary (no framing)."""

    def __init__(self, schema_dir: Path = SCHEMA_DIR, max_message_bytes: int = 65536):
        self.transaction_schema = load_schema("transaction", schema_dir)
        # An Avro boolean is the byte 0 or 1; fastavro reads any other byte as true (Java reads it as false),
        # so transactions are read with booleans as 1-byte fixeds and checked.
        self._reader_schema = load_schema("transaction", schema_dir, booleans_as_bytes=True)
        self._booleans = [f["name"] for f in self.transaction_schema["fields"] if f["type"] == "boolean"]
        self.verdict_schema = load_schema("verdict", schema_dir)
        self.max_message_bytes = max_message_bytes

    def decode_transaction(self, value: bytes | None) -> Transaction:
        """Decode one message value; raise DecodeError with a reason on any failure."""
        if not value:
            raise DecodeError("empty message value")
        if len(value) > self.max_message_bytes:
            raise DecodeError(f"message of {len(value)} bytes exceeds max_message_bytes={self.max_message_bytes}")
        buf = io.BytesIO(value)
        try:
            record = fastavro.schemaless_reader(buf, self._reader_schema, None)
        except Exception as exc:  # fastavro raises EOFError, ValueError, UnicodeDecodeError, IndexError...
            raise DecodeError(f"not a Transaction: {type(exc).__name__}: {exc}"[:300]) from exc
        if buf.tell() != len(value):
            raise DecodeError(f"{len(value) - buf.tell()} trailing bytes after a Transaction record")
        for name in self._booleans:
            if record[name] not in (b"\x00", b"\x01"):
                raise DecodeError(f"{name} holds byte {record[name][0]}, not an Avro boolean (0 or 1)")
            record[name] = record[name] == b"\x01"
        return Transaction(**record)

    def encode_transaction(self, txn: Transaction) -> bytes:
        """Encode a Transaction (used by the traffic producer and tests)."""
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, self.transaction_schema, _asdict(txn))
        return buf.getvalue()

    def encode_verdict(self, verdict: Verdict) -> bytes:
        """Encode a Verdict."""
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, self.verdict_schema, _asdict(verdict))
        return buf.getvalue()

    def decode_verdict(self, value: bytes) -> dict:
        """Decode a Verdict (used by readers of the verdict topic)."""
        return fastavro.schemaless_reader(io.BytesIO(value), self.verdict_schema, None)


def _asdict(record) -> dict:
    out = {name: getattr(record, name) for name in record.__slots__}
    if "decision" in out:
        out["decision"] = out["decision"].value
    return out


def validate(txn: Transaction) -> None:
    """Raise ValidationError if the transaction holds values that cannot be scored."""
    for name in ("transaction_id", "card_id"):
        value = getattr(txn, name)
        if not value or len(value) > _MAX_ID_CHARS:
            raise ValidationError(f"{name} must hold 1..{_MAX_ID_CHARS} characters")
    for name in _DOUBLES:
        value = getattr(txn, name)
        if not math.isfinite(value):
            raise ValidationError(f"{name} is not finite: {value!r}")
        if value < 0:
            raise ValidationError(f"{name} is negative: {value!r}")
    if not _MIN_EVENT_MS <= txn.event_time < _MAX_EVENT_MS:
        raise ValidationError(f"event_time {txn.event_time} is outside 2000..2100")
