"""Any input schema: records decoded as a batch, the manifest's paths and transforms make the features.

The batch codec (worker/avro/codec.py) is compiled for schemas/transaction.avsc; this one reads any Avro record schema
(nested records, nullable unions, enums, fixed, decimals, timestamps) with the schema-compiled BatchDecoder
(worker/avro/avrobatch.py), or record by record with fastavro where that does not compile (arrays, maps), and writes
verdicts with fastavro. Timestamps are epoch milliseconds UTC once read.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import fastavro
import numpy as np
from fastavro.schema import to_parsing_canonical_form

from ..model.manifest import Manifest, ManifestError
from .avrobatch import BatchDecoder, Unsupported
from .codec import (
    SCHEMA_DIR, Codec, DecodeError, ValidationError, load_schema, logical_types, read_verdict,
    without_logical_types,
)

_MAX_ID_BYTES = 128
# Up to this many values fastavro reads them one by one: cheaper than the batch decoder's fixed cost (measured: even
# at about 24 values of the bank example).
SMALL_BATCH = 16
_ABSENT = object()


@dataclass(slots=True)
class RecordBatch:
    """Decoded records of one batch; `rows` maps each back to its position in the consumed batch."""

    rows: list[int]
    records: list[dict]
    event_times: np.ndarray  # epoch ms, one per record

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, positions: Sequence[int]) -> RecordBatch:
        """The batch restricted to the given positions."""
        return RecordBatch([self.rows[i] for i in positions], [self.records[i] for i in positions],
                           self.event_times[np.asarray(positions, dtype=np.intp)])


class RecordCodec:
    """Reads records of a user's schema and writes verdicts (schemas/verdict.avsc) with fastavro."""

    def __init__(self, input_schema: Path, manifest: Manifest, max_message_bytes: int = 65536,
                 schema_dir: Path = SCHEMA_DIR):
        self.transaction_avsc = json.loads(Path(input_schema).read_text())
        self.transaction_logical_types = logical_types(self.transaction_avsc)
        self.reader = fastavro.parse_schema(self.transaction_avsc)
        self.transaction_schema = fastavro.parse_schema(without_logical_types(self.transaction_avsc))
        self.verdict_avsc = json.loads((schema_dir / "verdict.avsc").read_text())
        self.verdict_schema = load_schema("verdict", schema_dir)
        self.manifest = manifest
        self.max_message_bytes = max_message_bytes
        self.verdict_prefix = b""
        try:
            self._compiled: BatchDecoder | None = BatchDecoder(self.transaction_avsc)
        except Unsupported:  # arrays, maps, named references, wider unions: fastavro reads them record by record
            self._compiled = None

    def decode_batch(self, values: Sequence[bytes | None]) -> tuple[RecordBatch, dict[int, DecodeError]]:
        """Decode every value; return the records and a DecodeError for each value that is not one."""
        errors: dict[int, DecodeError] = {}
        for i, value in enumerate(values):
            if not value:
                errors[i] = DecodeError("empty message value")
            elif len(value) > self.max_message_bytes:
                errors[i] = DecodeError(f"message of {len(value)} bytes exceeds max_message_bytes={self.max_message_bytes}")
        readable = [i for i in range(len(values)) if i not in errors]
        rows, records, times = [], [], []
        m = self.manifest
        for i, record in zip(readable, self._read_all([values[i] for i in readable])):
            try:
                if isinstance(record, DecodeError):
                    raise record
                when = _epoch_ms(_at(record, m.event_time_field), m.event_time_field)
            except DecodeError as exc:
                errors[i] = exc
                continue
            rows.append(i)
            records.append(record)
            times.append(when)
        return RecordBatch(rows, records, np.array(times, dtype=np.int64)), errors

    def _read_all(self, values: list[bytes]) -> list[dict | DecodeError]:
        """Each value as a record: by the compiled batch decoder when the schema compiles, else by fastavro."""
        if self._compiled is None:
            return [self._read(v) for v in values]
        if len(values) > SMALL_BATCH:
            return self._decode_compiled(values)
        records = [self._read_canonical(v) for v in values]
        rest = [i for i, r in enumerate(records) if r is None]
        if rest:
            for i, r in zip(rest, self._decode_compiled([values[i] for i in rest])):
                records[i] = r
        return records

    def _decode_compiled(self, values: list[bytes]) -> list[dict | DecodeError]:
        """Each value as a record by the batch decoder, or a DecodeError with its reason."""
        records, errors = self._compiled.decode(values)
        name = self.reader.get("name")
        return [DecodeError(f"not a {name} record: {errors[i]}") if r is None else r for i, r in enumerate(records)]

    def _read_canonical(self, value: bytes) -> dict | None:
        """The record by fastavro when writing it back gives exactly `value` (so the batch decoder, which accepts
        all such bytes and returns what fastavro returns, would read the same), else None."""
        record = self._read(value)
        if isinstance(record, DecodeError):
            return None
        out = io.BytesIO()
        try:
            fastavro.schemaless_writer(out, self.reader, record)
        except Exception:  # fastavro cannot write back what it read: leave it to the batch decoder
            return None
        return record if out.getvalue() == value else None

    def _read(self, value: bytes) -> dict | DecodeError:
        body = io.BytesIO(value)
        try:
            record = fastavro.schemaless_reader(body, self.reader, None)
        except Exception as exc:  # fastavro raises what the bytes provoke (EOFError, IndexError, UnicodeError, …)
            return DecodeError(f"not a {self.reader.get('name')} record: {type(exc).__name__}: {exc}")
        if body.tell() != len(value):
            return DecodeError(f"{len(value) - body.tell()} trailing bytes after a {self.reader.get('name')} record")
        return record

    def validation_errors(self, batch: RecordBatch) -> dict[int, ValidationError]:
        """A ValidationError per position whose id or card id is not a string of 1..128 UTF-8 bytes."""
        errors = {}
        for pos, record in enumerate(batch.records):
            for path in (self.manifest.id_field, self.manifest.card_field):
                value = _at(record, path)
                if not isinstance(value, str) or not 1 <= len(value.encode()) <= _MAX_ID_BYTES:
                    errors[pos] = ValidationError(f"{path} must hold 1..{_MAX_ID_BYTES} bytes")
                    break
        return errors

    def features(self, batch: RecordBatch, manifest: Manifest) -> tuple[np.ndarray, dict[int, ValidationError]]:
        """The model's input matrix for the batch, and a ValidationError per position with a missing or non-finite
        value whose feature has no `missing` policy."""
        errors: dict[int, ValidationError] = {}
        columns = []
        for f in manifest.features:
            values = [_at(r, f.source) for r in batch.records]
            absent = np.fromiter((v is None or v is _ABSENT for v in values), dtype=bool, count=len(values))
            if f.transform == "lookup":
                column = f.from_texts([_text(v) for v in values])
            else:
                column = f.from_numbers(np.fromiter((_number(v) for v in values), dtype=np.float64, count=len(values)))
            if f.missing is not None:
                column[absent] = f.missing
            else:
                for pos in np.flatnonzero(absent):
                    errors.setdefault(int(pos), ValidationError(f"{f.source} is missing (null or absent)"))
            for pos in np.flatnonzero(~np.isfinite(column) & ~absent):
                errors.setdefault(int(pos), ValidationError(f"{f.source} gives a non-finite feature value"))
            columns.append(f.clipped(column))
        x = manifest.standardised(columns, len(batch))
        return x, errors

    def identity(self, batch: RecordBatch, i: int) -> tuple[str, str, int]:
        """Record i's id, card id and event time (epoch ms)."""
        m, record = self.manifest, batch.records[i]
        return _at(record, m.id_field), _at(record, m.card_field), int(batch.event_times[i])

    def encode_verdicts(self, batch: RecordBatch, probabilities: np.ndarray, decisions: np.ndarray,
                        thresholds: tuple[float, float], model: tuple[str, str], scored_at: int) -> list[bytes]:
        """One verdict per record, in the verdict schema, with the manifest's id, card and copied fields."""
        m, out = self.manifest, []
        for record, when, p, d in zip(batch.records, batch.event_times.tolist(), probabilities.tolist(),
                                      decisions.tolist()):
            verdict = {
                "transaction_id": _at(record, m.id_field), "card_id": _at(record, m.card_field),
                "fraud_probability": p, "is_fraud": d == 2, "decision": ("APPROVE", "REVIEW", "DECLINE")[d],
                "review_threshold": thresholds[0], "decline_threshold": thresholds[1],
                "model_name": model[0], "model_version": model[1], "event_time": when, "scored_at": scored_at,
                "attributes": {path: _text(_at(record, path)) for path in m.copy_fields},
            }
            buf = io.BytesIO()
            buf.write(self.verdict_prefix)
            fastavro.schemaless_writer(buf, self.verdict_schema, verdict)
            out.append(buf.getvalue())
        return out

    def decode_verdict(self, value: bytes) -> dict:
        """Decode a verdict, plain or in the wire format."""
        return read_verdict(value, self.verdict_schema)


def load_input_schema(path: Path | None) -> dict | None:
    """The input schema at `path` as JSON, or None for ours (also when `path` has our schema's layout).

    Raises ManifestError with one line when the file is not a readable Avro record schema.
    """
    if path is None:
        return None
    try:
        raw = json.loads(Path(path).read_text())
        parsed = fastavro.parse_schema(raw)
    except FileNotFoundError:
        raise ManifestError(f"input schema not found: {path}") from None
    except KeyError as exc:
        raise ManifestError(f"input schema {path} is not a valid Avro schema: it has no {exc} key (is it an .avsc?)") from None
    except Exception as exc:
        raise ManifestError(f"input schema {path} is not a valid Avro schema: {exc}") from None
    if parsed.get("type") != "record":
        raise ManifestError(f"input schema {path} is a {parsed.get('type')}, not a record")
    ours = fastavro.parse_schema(json.loads((SCHEMA_DIR / "transaction.avsc").read_text()))
    return None if to_parsing_canonical_form(parsed) == to_parsing_canonical_form(ours) else raw


def input_codec(input_schema: Path | None, manifest: Manifest, max_message_bytes: int) -> Codec | RecordCodec:
    """The compiled batch codec for our schema, the record codec for any other."""
    if load_input_schema(input_schema) is None:
        return Codec(max_message_bytes=max_message_bytes)
    return RecordCodec(input_schema, manifest, max_message_bytes)


def _at(record: dict, path: str):
    """The value at a dotted path (None for null on the way, _ABSENT for a field the record does not have)."""
    node = record
    for name in path.split("."):
        if node is None:
            return None
        if not isinstance(node, dict) or name not in node:
            return _ABSENT
        node = node[name]
    return node


def _number(v) -> float:
    if v is None or v is _ABSENT:
        return np.nan
    if isinstance(v, datetime):
        return v.timestamp() * 1000.0
    if isinstance(v, (bool, int, float, Decimal)):
        return float(v)
    return np.nan


def _text(v) -> str:
    if isinstance(v, datetime):
        return v.isoformat()
    return "" if v is None or v is _ABSENT else str(v)


def _epoch_ms(v, path: str) -> int:
    if isinstance(v, datetime):
        if v.tzinfo is None:  # local-timestamp-*: taken as UTC
            v = v.replace(tzinfo=timezone.utc)
        return int(v.timestamp() * 1000)
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    raise DecodeError(f"{path} holds no event time")
