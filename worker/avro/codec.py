"""Avro for transactions and verdicts: a batch codec compiled to our two schemas, and fastavro for the rest."""

from __future__ import annotations

import functools
import io
import json
import math
import operator
import re
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import fastavro
import numpy as np

from ..records import Decision, Transaction, Verdict

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
# Event times outside 2000-01-01 .. 2100-01-01 are data errors, not payments.
_MIN_EVENT_MS, _MAX_EVENT_MS = 946_684_800_000, 4_102_444_800_000
_MAX_ID_BYTES = 128
_DOUBLES = ("amount", "distance_from_home", "distance_from_last_transaction", "ratio_to_median_purchase_price")
_BOOLEANS = ("repeat_retailer", "used_chip", "used_pin_number", "online_order")
# The wire layout the batch codec is written for; Codec refuses schemas that differ from it.
TRANSACTION_LAYOUT = [("transaction_id", "string"), ("card_id", "string"), ("amount", "double"),
                      ("event_time", "long"), ("distance_from_home", "double"),
                      ("distance_from_last_transaction", "double"), ("ratio_to_median_purchase_price", "double"),
                      *((name, "boolean") for name in _BOOLEANS)]
VERDICT_LAYOUT = [("transaction_id", "string"), ("card_id", "string"), ("fraud_probability", "double"),
                  ("is_fraud", "boolean"), ("decision", "enum"), ("review_threshold", "double"),
                  ("decline_threshold", "double"), ("model_name", "string"), ("model_version", "string"),
                  ("event_time", "long"), ("scored_at", "long"), ("attributes", "map")]
# The fixed-width parts of a transaction (amount, then the three doubles and four booleans after event_time).
_FIXED = np.dtype([(name, "<f8") for name in _DOUBLES] + [(name, "u1") for name in _BOOLEANS])
_TAIL_BYTES = 3 * 8 + 4
_DOUBLE = struct.Struct("<d")
_PAD = 16
_PADDING = bytes(_PAD)
_TEN = np.arange(10)
_SHIFTS = (np.arange(10) * 7).astype(np.uint64)
_AMOUNT = np.arange(8)
_TAIL = np.arange(_TAIL_BYTES)
_DECISION_CODES = (Decision.APPROVE, Decision.REVIEW, Decision.DECLINE)
_VARINT = re.compile(rb"[\x80-\xff]*[\x00-\x7f]")
# Up to this many values a batch is decoded, validated and turned into features row by row in Python: numpy's cost
# per call outweighs its speed per row on so few (measured: even at about 40 values with the reference model).
SMALL_BATCH = 32
# Where each numeric field sits in a row of TransactionBatch.fixed.tolist() followed by the event time.
_ROW_AT = {name: k for k, name in enumerate((*_FIXED.names, "event_time"))}


@functools.lru_cache(maxsize=16)
def _picker(sources: tuple[str, ...]) -> operator.itemgetter:
    """Picks the sources' values, in order, out of such a row."""
    return operator.itemgetter(*(_ROW_AT[name] for name in sources))


class DecodeError(ValueError):
    """The bytes are not a Transaction in our schema."""


class ValidationError(ValueError):
    """A decoded Transaction holds values that cannot be scored."""


def load_schema(name: str, schema_dir: Path = SCHEMA_DIR) -> dict:
    """Parse schemas/<name>.avsc, keeping timestamps as plain epoch-millisecond longs."""
    raw = json.loads((schema_dir / f"{name}.avsc").read_text())
    for f in raw["fields"]:
        if isinstance(f["type"], dict) and f["type"].get("logicalType") == "timestamp-millis":
            f["type"] = "long"
    return fastavro.parse_schema(raw)


def without_logical_types(node):
    """The schema with every logicalType removed: values are read as their Avro types (epoch numbers, bytes)."""
    if isinstance(node, dict):
        return {k: without_logical_types(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [without_logical_types(v) for v in node]
    return node


def logical_types(schema: dict) -> dict[str, str | None]:
    """Each top-level field's logicalType (None for none)."""
    return {f["name"]: f["type"].get("logicalType") if isinstance(f["type"], dict) else None
            for f in schema.get("fields", [])}


def _layout(schema: dict) -> list[tuple[str, str]]:
    return [(f["name"], f["type"] if isinstance(f["type"], str) else f["type"]["type"]) for f in schema["fields"]]


@dataclass(slots=True)
class TransactionBatch:
    """Decoded transactions as columns; `rows` maps each back to its position in the consumed batch."""

    rows: list[int]
    buf: np.ndarray  # the batch's values back to back (uint8), every varint canonical, with spans into it per row:
    starts: np.ndarray  # record start = start of transaction_id's length prefix
    card_starts: np.ndarray  # start of card_id's length prefix
    id_ends: np.ndarray  # end of card_id = start of amount
    time_ends: np.ndarray  # end of event_time's varint
    event_times: np.ndarray
    fixed: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> np.ndarray:
        """A numeric field as float64 (booleans as 0.0/1.0)."""
        if name == "event_time":
            return self.event_times.astype(np.float64)
        return self.fixed[name].astype(np.float64)

    def take(self, positions: Sequence[int]) -> TransactionBatch:
        """The batch restricted to the given positions."""
        idx = np.asarray(positions, dtype=np.intp)
        return TransactionBatch([self.rows[i] for i in positions], self.buf, self.starts[idx], self.card_starts[idx],
                                self.id_ends[idx], self.time_ends[idx], self.event_times[idx], self.fixed[idx])

    def ids(self, i: int) -> tuple[str, str]:
        """Row i's transaction_id and card_id (a DecodeError if they are not UTF-8)."""
        start = int(self.starts[i])
        raw = self.buf[start:int(self.id_ends[i])].tobytes()
        return _read_string(raw, 0, "transaction_id")[0], _read_string(raw, int(self.card_starts[i]) - start, "card_id")[0]

    def transaction(self, i: int) -> Transaction:
        """Row i as a typed Transaction."""
        f = self.fixed[i]
        return Transaction(*self.ids(i), float(f["amount"]), int(self.event_times[i]),
                           *(float(f[n]) for n in _DOUBLES[1:]), *(bool(f[n]) for n in _BOOLEANS))

    @classmethod
    def of(cls, txns: Sequence[Transaction]) -> TransactionBatch:
        """Typed transactions as a batch (for the Python API and tests)."""
        batch, errors = _plain_codec().decode_batch([Codec.encode_transaction(t) for t in txns])
        assert not errors, errors
        return batch


_TRANSACTION_WRITER = load_schema("transaction")


class Codec:
    """Reads batches of transactions and writes batches of verdicts in plain Avro binary (no framing)."""

    def __init__(self, schema_dir: Path = SCHEMA_DIR, max_message_bytes: int = 65536):
        self.transaction_schema = load_schema("transaction", schema_dir)
        self.verdict_schema = load_schema("verdict", schema_dir)
        for name, schema, layout in (("transaction", self.transaction_schema, TRANSACTION_LAYOUT),
                                     ("verdict", self.verdict_schema, VERDICT_LAYOUT)):
            if _layout(schema) != layout:
                raise ValueError(f"schemas/{name}.avsc no longer matches the layout worker/avro/codec.py is written for")
        self.max_message_bytes = max_message_bytes
        self.verdict_prefix = b""
        # The schemas as written (logical types included), for a Schema Registry.
        self.transaction_avsc, self.verdict_avsc = (json.loads((schema_dir / f"{n}.avsc").read_text())
                                                    for n in ("transaction", "verdict"))
        self.transaction_logical_types = logical_types(self.transaction_avsc)

    def decode_batch(self, values: Sequence[bytes | None]) -> tuple[TransactionBatch, dict[int, DecodeError]]:
        """Decode every value; return the decoded ones as columns and a DecodeError for each of the others."""
        n, limit = len(values), self.max_message_bytes
        if n <= SMALL_BATCH:
            return self._decode_carefully(values, range(n))
        # Values back to back (oversized ones left out), padded so that reads past a short record stay in bounds.
        sizes = np.fromiter((len(v) if v and len(v) <= limit else 0 for v in values), dtype=np.int64, count=n)
        buf = np.frombuffer(b"".join(v for v in values if v and len(v) <= limit) + _PADDING, dtype=np.uint8)
        ends = np.cumsum(sizes)
        starts = ends - sizes
        ok = sizes > 0
        # The common case, vectorised: both ids shorter than 64 bytes (one-byte zig-zag lengths).
        a = buf[starts].astype(np.int64)
        card = starts + 1 + (a >> 1)
        b = buf[np.minimum(card, len(buf) - 1)].astype(np.int64)
        id_end = card + 1 + (b >> 1)
        ok &= ((a & 0x81) == 0) & ((b & 0x81) == 0) & (id_end + 8 + 1 + _TAIL_BYTES <= ends)
        time_start = np.where(ok, id_end + 8, 0)
        window = buf[time_start[:, None] + _TEN].astype(np.uint64)
        more = window >= 0x80
        length = np.argmin(more, axis=1) + 1
        ok &= ~more.all(axis=1) & (time_start + length + _TAIL_BYTES == ends) & (length < 10)
        # A multi-byte varint ending in a zero group is non-canonical; the careful path rewrites it.
        ok &= (length == 1) | (buf[time_start + length - 1] != 0)
        digits = np.where(_TEN[None, :] < length[:, None], window & 0x7F, 0) << _SHIFTS
        zigzag = np.bitwise_or.reduce(digits, axis=1)
        times = ((zigzag >> np.uint64(1)) ^ (np.uint64(0) - (zigzag & np.uint64(1)))).view(np.int64)
        time_end = time_start + length
        good = np.flatnonzero(ok)
        fixed = buf[np.concatenate([id_end[good, None] + _AMOUNT, time_end[good, None] + _TAIL], axis=1)]
        batch = TransactionBatch(good.tolist(), buf, starts[good], card[good], id_end[good], time_end[good],
                                 times[good], fixed.reshape(-1).view(_FIXED))
        errors: dict[int, DecodeError] = {}
        rest = np.flatnonzero(~ok).tolist()
        if rest:
            # Long ids, non-canonical varints and all damage take the careful path, which also says what is wrong.
            careful, errors = self._decode_carefully(values, rest)
            batch = _concat(batch, careful) if len(careful) else batch
        non_ascii = _non_ascii_ids(batch)
        if non_ascii or _bad_booleans(batch):
            batch, errors = _check_ids_and_booleans(batch, errors)
        return batch, errors

    def _decode_carefully(self, values: Sequence[bytes | None], rows: Sequence[int]) -> tuple[TransactionBatch, dict]:
        kept, heads, errors = [], [], {}
        for i in rows:
            try:
                heads.append(self._read_head(values[i]))
                kept.append(i)
            except DecodeError as exc:
                errors[i] = exc
        return _batch_of(kept, heads), errors

    def _read_head(self, value: bytes | None) -> tuple[int, int, int, int, bytes]:
        """(card_id start, card_id end, event_time, event_time end, record) of one record rewritten canonically."""
        if not value:
            raise DecodeError("empty message value")
        size = len(value)
        if size > self.max_message_bytes:
            raise DecodeError(f"message of {size} bytes exceeds max_message_bytes={self.max_message_bytes}")
        transaction_id, card = _read_string(value, 0, "transaction_id")
        card_id, id_end = _read_string(value, card, "card_id")
        if id_end + 8 > size:
            raise DecodeError("not a Transaction: truncated in amount")
        et, et_end = _read_long(value, id_end + 8, "event_time")
        if et_end + _TAIL_BYTES != size:
            short = et_end + _TAIL_BYTES - size
            raise DecodeError(f"not a Transaction: {short} bytes missing" if short > 0
                              else f"{-short} trailing bytes after a Transaction record")
        _check_booleans(value[-4:])
        # One-byte lengths and an event time without trailing zero groups: the record is canonical as it is.
        if value[0] < 0x80 and value[card] < 0x80 and (et_end == id_end + 9 or value[et_end - 1]):
            return card, id_end, et, et_end, value
        tid, cid, time = _string(transaction_id), _string(card_id), _long(et)
        head = len(tid) + len(cid)
        return len(tid), head, et, head + 8 + len(time), tid + cid + value[id_end:id_end + 8] + time + value[et_end:]

    @staticmethod
    def validation_errors(batch: TransactionBatch) -> dict[int, ValidationError]:
        """See validation_errors()."""
        return validation_errors(batch)

    @staticmethod
    def features(batch: TransactionBatch, manifest) -> tuple[np.ndarray, dict]:
        """The model's input matrix for the batch (every value is already validated)."""
        sources = manifest.constants.raw_sources
        if len(batch) > SMALL_BATCH or sources is None:
            return manifest.matrix(batch.column, len(batch)), {}
        pick = _picker(sources)
        rows = [pick((*f, t)) for f, t in zip(batch.fixed.tolist(), batch.event_times.tolist())]
        return manifest.standardise(np.array(rows, dtype=np.float64).reshape(len(batch), len(sources))), {}

    @staticmethod
    def identity(batch: TransactionBatch, i: int) -> tuple[str, str, int]:
        """Row i's transaction_id, card_id and event time (epoch ms)."""
        return *batch.ids(i), int(batch.event_times[i])

    def decode_transaction(self, value: bytes | None) -> Transaction:
        """Decode one message value; raise DecodeError with a reason on any failure."""
        batch, errors = self.decode_batch([value])
        if errors:
            raise errors[0]
        return batch.transaction(0)

    def encode_verdicts(self, batch: TransactionBatch, probabilities: np.ndarray, decisions: np.ndarray,
                        thresholds: tuple[float, float], model: tuple[str, str], scored_at: int) -> list[bytes]:
        """Encode one verdict per row, copying the input's Avro bytes for the ids and the event time.

        Each starts with `verdict_prefix` (the 5-byte wire-format header when a Schema Registry is used).
        """
        flags = _verdict_middles(*thresholds, *model)
        scored = _long(scored_at) + b"\x00"  # and an empty `attributes` map
        raw = batch.buf.tobytes() if len(batch) else b""
        pack = _DOUBLE.pack
        prefix = self.verdict_prefix
        return [prefix + raw[s:k] + pack(p) + flags[d] + raw[k + 8:e] + scored
                for s, k, e, p, d in zip(batch.starts.tolist(), batch.id_ends.tolist(), batch.time_ends.tolist(),
                                         probabilities.tolist(), decisions.tolist())]

    @staticmethod
    def encode_transaction(txn: Transaction) -> bytes:
        """Encode a Transaction with fastavro (used by the traffic producer and tests)."""
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, _TRANSACTION_WRITER, _asdict(txn))
        return buf.getvalue()

    def encode_verdict(self, verdict: Verdict) -> bytes:
        """Encode one Verdict with fastavro (tools and tests; the worker uses encode_verdicts)."""
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, self.verdict_schema, _asdict(verdict))
        return buf.getvalue()

    def decode_verdict(self, value: bytes) -> dict:
        """Decode a Verdict, plain or in the wire format (used by readers of the verdict topic)."""
        return read_verdict(value, self.verdict_schema)


def read_verdict(value: bytes, schema: dict) -> dict:
    """A verdict, plain or after a 5-byte wire-format header: a plain one whose transaction_id is empty also starts
    with the byte 0, so the header is taken as such only when the rest is exactly one verdict."""
    if value[:1] == b"\x00" and len(value) > 5:
        body = io.BytesIO(value)
        body.seek(5)
        try:
            verdict = fastavro.schemaless_reader(body, schema, None)
            if body.tell() == len(value):
                return verdict
        except Exception:
            pass  # not framed after all
    return fastavro.schemaless_reader(io.BytesIO(value), schema, None)


def validation_errors(batch: TransactionBatch) -> dict[int, ValidationError]:
    """A ValidationError per batch position whose values cannot be scored, checked column by column."""
    if len(batch) <= SMALL_BATCH and _plainly_valid(batch):
        return {}
    ids = [(name, _canonical_length(batch.buf, lo)) for name, lo in (("transaction_id", batch.starts),
                                                                      ("card_id", batch.card_starts))]
    bad_ids = [(name, (size < 1) | (size > _MAX_ID_BYTES)) for name, size in ids]
    doubles = np.column_stack([batch.fixed[name] for name in _DOUBLES])
    non_finite, negative = ~np.isfinite(doubles), doubles < 0
    times = batch.event_times
    outside = (times < _MIN_EVENT_MS) | (times >= _MAX_EVENT_MS)
    if not (bad_ids[0][1] | bad_ids[1][1] | outside | (non_finite | negative).any(axis=1)).any():
        return {}
    # Some row is wrong: say what, the first reason in this order per row.
    errors: dict[int, ValidationError] = {}
    for name, bad in bad_ids:
        for pos in np.flatnonzero(bad):
            errors.setdefault(int(pos), ValidationError(f"{name} must hold 1..{_MAX_ID_BYTES} bytes"))
    for j, name in enumerate(_DOUBLES):
        values = doubles[:, j]
        for pos in np.flatnonzero(non_finite[:, j]):
            errors.setdefault(int(pos), ValidationError(f"{name} is not finite: {float(values[pos])!r}"))
        for pos in np.flatnonzero(negative[:, j]):
            errors.setdefault(int(pos), ValidationError(f"{name} is negative: {float(values[pos])!r}"))
    for pos in np.flatnonzero(outside):
        errors.setdefault(int(pos), ValidationError(f"event_time {int(times[pos])} is outside 2000..2100"))
    return errors


def _plainly_valid(batch: TransactionBatch) -> bool:
    """Whether, looked at row by row, every row is plainly valid: ids of 1..63 bytes (one-byte lengths), doubles
    finite and not negative, the event time in range. False leaves the verdict to validation_errors' columns."""
    buf, inf = memoryview(batch.buf), math.inf
    return all(2 <= buf[s] < 0x80 and 2 <= buf[c] < 0x80 and _MIN_EVENT_MS <= t < _MAX_EVENT_MS
               and 0.0 <= f[0] < inf and 0.0 <= f[1] < inf and 0.0 <= f[2] < inf and 0.0 <= f[3] < inf
               for s, c, t, f in zip(batch.starts.tolist(), batch.card_starts.tolist(), batch.event_times.tolist(),
                                     batch.fixed.tolist()))


def validate(txn: Transaction) -> None:
    """Raise ValidationError if the transaction holds values that cannot be scored."""
    errors = validation_errors(TransactionBatch.of([txn]))
    if errors:
        raise errors[0]


def _canonical_length(buf: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The lengths declared by the canonical varints at starts: exact below 8192, and 8192 for any longer one."""
    low, high = buf[starts].astype(np.int64), buf[starts + 1].astype(np.int64)
    two_bytes = ((low & 0x7F) | (high << 7)) >> 1
    return np.where(low < 0x80, low >> 1, np.where(high < 0x80, two_bytes, 8192))


def _read_long(buf: bytes, pos: int, name: str) -> tuple[int, int]:
    """A zig-zag varint at pos, of any length as fastavro reads it, if its value fits in 64 bits."""
    match = _VARINT.match(buf, pos)
    if match is None:
        raise DecodeError(f"not a Transaction: truncated in {name}")
    end = match.end()
    # Past ten bytes fastavro reads on, but only zero groups keep its value: its C reader wraps other bits around.
    if end - pos > 10 and buf[pos + 10:end].lstrip(b"\x80") != b"\x00":
        raise DecodeError(f"not a Transaction: {name} does not fit in a 64-bit long")
    acc = 0
    for b in reversed(buf[pos:min(end, pos + 10)]):
        acc = (acc << 7) | (b & 0x7F)
    if acc >> 64:
        raise DecodeError(f"not a Transaction: {name} does not fit in a 64-bit long")
    return (acc >> 1) ^ -(acc & 1), end


def _read_string(buf: bytes, pos: int, name: str) -> tuple[str, int]:
    if pos < len(buf) and buf[pos] < 0x80:  # the common case: a one-byte length
        n, pos = buf[pos] >> 1 if not buf[pos] & 1 else -((buf[pos] + 1) >> 1), pos + 1
    else:
        n, pos = _read_long(buf, pos, name)
    if n < 0 or pos + n > len(buf):
        raise DecodeError(f"not a Transaction: {name} declares {n} bytes, {len(buf) - pos} remain")
    try:
        return buf[pos:pos + n].decode(), pos + n
    except UnicodeDecodeError:
        raise DecodeError(f"not a Transaction: {name} is not UTF-8") from None


@functools.cache
def _plain_codec() -> Codec:
    return Codec(max_message_bytes=1 << 30)


def _empty() -> TransactionBatch:
    none = np.zeros(0, dtype=np.int64)
    return TransactionBatch([], np.zeros(_PAD, dtype=np.uint8), none, none, none, none, none, np.zeros(0, dtype=_FIXED))


def _batch_of(rows: list[int], heads: list[tuple[int, int, int, int, bytes]]) -> TransactionBatch:
    """The records read by Codec._read_head as a batch over a new buffer."""
    if not heads:
        return _empty()
    starts, card_starts, id_ends, time_ends, times, records, fixed = [], [], [], [], [], [], []
    at = 0
    for card, head, et, time_end, record in heads:
        starts.append(at)
        card_starts.append(at + card)
        id_ends.append(at + head)
        time_ends.append(at + time_end)
        times.append(et)
        records.append(record)
        fixed += (record[head:head + 8], record[time_end:])
        at += len(record)
    records.append(_PADDING)
    n = len(rows)
    c = np.frombuffer(array("q", starts + card_starts + id_ends + time_ends + times), dtype=np.int64)
    return TransactionBatch(rows, np.frombuffer(b"".join(records), dtype=np.uint8), c[:n], c[n:2 * n], c[2 * n:3 * n],
                            c[3 * n:4 * n], c[4 * n:], np.frombuffer(b"".join(fixed), dtype=_FIXED))


def _concat(a: TransactionBatch, b: TransactionBatch) -> TransactionBatch:
    """Two batches over different buffers as one, in row order."""
    buf = np.concatenate([a.buf, b.buf])
    shift = len(a.buf)
    order = np.argsort(np.array(a.rows + b.rows), kind="stable")
    pick = lambda x, y: np.concatenate([x, y])[order]  # noqa: E731
    return TransactionBatch(np.array(a.rows + b.rows)[order].tolist(), buf, pick(a.starts, b.starts + shift),
                            pick(a.card_starts, b.card_starts + shift), pick(a.id_ends, b.id_ends + shift),
                            pick(a.time_ends, b.time_ends + shift), pick(a.event_times, b.event_times),
                            pick(a.fixed, b.fixed))


def _non_ascii_ids(batch: TransactionBatch) -> bool:
    """Whether any id holds a byte >= 0x80 (then UTF-8 must be checked row by row)."""
    if not len(batch):
        return False
    bounds = np.stack([batch.starts, batch.id_ends], axis=1).reshape(-1)
    return bool((np.maximum.reduceat(batch.buf, bounds)[::2] >= 0x80).any())


def _bad_booleans(batch: TransactionBatch) -> bool:
    return any(bool((batch.fixed[name] > 1).any()) for name in _BOOLEANS)


def _check_ids_and_booleans(batch: TransactionBatch, errors: dict[int, DecodeError]):
    """Drop rows whose ids are not UTF-8 or whose booleans are not the byte 0 or 1."""
    keep = []
    for pos in range(len(batch)):
        try:
            batch.ids(pos)
            _check_booleans(bytes(batch.fixed[pos].tolist()[len(_DOUBLES):]))
            keep.append(pos)
        except DecodeError as exc:
            errors[batch.rows[pos]] = exc
    return batch.take(keep), errors


def _check_booleans(flags: bytes) -> None:
    """Raise DecodeError unless the four boolean bytes are each 0 or 1."""
    if flags.strip(b"\x00\x01"):
        # An Avro boolean is the byte 0 or 1; any other byte means these are not our records.
        name, byte = next((name, byte) for name, byte in zip(_BOOLEANS, flags) if byte > 1)
        raise DecodeError(f"{name} holds byte {byte}, not an Avro boolean (0 or 1)")


@functools.lru_cache(maxsize=16)
def _verdict_middles(review: float, decline: float, name: str, version: str) -> tuple[bytes, bytes, bytes]:
    """A verdict's bytes from is_fraud to model_version, for decision codes 0, 1 and 2."""
    middle = _DOUBLE.pack(review) + _DOUBLE.pack(decline) + _string(name) + _string(version)
    # is_fraud (a boolean byte) and the decision (an enum index, zig-zag encoded) for APPROVE, REVIEW, DECLINE.
    return b"\x00\x00" + middle, b"\x00\x02" + middle, b"\x01\x04" + middle


def _long(value: int) -> bytes:
    """Avro's zig-zag varint encoding of a long."""
    n = (value << 1) ^ (value >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _string(value: str) -> bytes:
    data = value.encode()
    return _long(len(data)) + data


def _asdict(record) -> dict:
    out = {name: getattr(record, name) for name in record.__slots__}
    if "decision" in out:
        out["decision"] = out["decision"].value
    return out


def decision_of(code: int) -> Decision:
    """The Decision for a decision code 0, 1, 2."""
    return _DECISION_CODES[code]


def decision_codes(probabilities: np.ndarray, review: float, decline: float) -> np.ndarray:
    """Decision codes: 2 (DECLINE) strictly above `decline`, 1 (REVIEW) strictly above `review`, else 0."""
    if len(probabilities) <= SMALL_BATCH:
        return np.array([2 if p > decline else 1 if p > review else 0 for p in probabilities.tolist()], dtype=np.int64)
    return np.where(probabilities > decline, 2, np.where(probabilities > review, 1, 0))
