"""A batch decoder for Avro records compiled from a record schema: all records' field k at once, with numpy.

    decoder = BatchDecoder(json.loads(Path("schemas/transaction.avsc").read_text()))
    records, errors = decoder.decode(values)          # what fastavro.schemaless_reader returns, record for record
    columns, rows, errors = decoder.columns(values)   # numpy columns per leaf field over the rows that decoded

The values are joined into one uint8 buffer (with zero padding, so reads past a short row stay in bounds) and
decoded field by field: a position per row, a varint as a [rows, 10] window, strings as (offset, length) spans.
A row that fails is dropped from the later fields with a one-line reason. Python runs per row only to make the
objects numpy cannot hold: strings (decoded, and so checked as UTF-8; in a batch of short strings with few distinct
values, each distinct one once), bytes, decimals, datetimes and the dicts of decode().

Acceptance is fastavro's (it reads the value without error and uses every byte), made strict where fastavro
silently accepts what no Avro writer produces and returns something other than what was written:
  * a boolean byte other than 0 or 1 (fastavro reads any non-zero byte as True),
  * a negative enum index or union branch (fastavro indexes the symbols or branches from the end),
  * a varint whose value does not fit in 64 bits (the C reader wraps the extra bits around; the pure-Python one
    returns a number no long can hold).
Zero-padded varints (0x80 ... 0x80 0x00 groups), which fastavro reads as the same number, are accepted, also past
ten bytes. Values of an "int" beyond 32 bits are returned as fastavro returns them.

Compiled: null, boolean, int, long, float, double, string, bytes, fixed, enum, nested records, unions of null
with one other type (either order), and the logical types fastavro converts: decimal (bytes or fixed),
timestamp-millis/-micros, local-timestamp-millis/-micros, date and uuid (on string). Any other logicalType that
fastavro ignores is read as its underlying type. Arrays, maps, references to named types, other unions and
time-millis/-micros raise Unsupported.
"""

from __future__ import annotations

import decimal
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone

import fastavro
import fastavro.read
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["BatchDecoder", "Unsupported"]

_PAD = 16
_AR10 = np.arange(10)
_SHIFTS = (np.arange(10) * 7).astype(np.uint64)
_LOW_BYTES = np.array([(1 << 8 * k) - 1 for k in range(8)], np.uint64)  # masks of the first k bytes (little end)
_UTC = timezone.utc
_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "string", "bytes"}
# The logical types fastavro converts that this decoder compiles ("<type>-<logicalType>", as fastavro keys them).
_LOGICAL = {"long-timestamp-millis", "long-timestamp-micros", "long-local-timestamp-millis",
            "long-local-timestamp-micros", "int-date", "bytes-decimal", "fixed-decimal", "string-uuid"}
# Microseconds from the epoch to datetime.min and datetime.max: what epoch + timedelta can reach.
_MIN_US, _MAX_US = -62_135_596_800_000_000, 253_402_300_799_999_999
# date.fromordinal(days + 719163) holds for ordinals 1 .. 3652059.
_MIN_DAY, _MAX_DAY = -719_162, 2_932_896


class Unsupported(ValueError):
    """The schema has a type this decoder does not compile."""


class _Batch:
    """One call's state: the joined buffer, each row's span, per-node arrays and the errors so far."""

    __slots__ = ("n", "raw", "buf", "win8", "win10", "start", "end", "slots", "seen", "errors")

    def __init__(self, values: Sequence[bytes], nslots: int):
        self.n = n = len(values)
        self.errors: dict[int, str] = {}
        missing = []
        try:
            lens = np.fromiter(map(len, values), np.int64, n)
        except TypeError:  # a None (a tombstone) among them
            missing = [i for i, v in enumerate(values) if v is None]
            values = [b"" if v is None else v for v in values]
            lens = np.fromiter(map(len, values), np.int64, n)
        self.end = np.cumsum(lens)
        self.start = self.end - lens
        self.raw = b"".join(values) + bytes(_PAD)
        self.buf = np.frombuffer(self.raw, np.uint8)
        self.win8 = sliding_window_view(self.buf, 8)
        self.win10 = sliding_window_view(self.buf, 10)
        self.slots: list = [None] * nslots
        self.seen: list = [None] * nslots
        for i in missing:
            self.errors[i] = "no value (None)"

    def fail(self, idx: np.ndarray, bad: np.ndarray, reason: str, detail: np.ndarray | None = None):
        """Record reason for the rows idx[bad]; the caller drops them."""
        rows = idx[bad].tolist()
        if detail is None:
            for r in rows:
                self.errors[r] = reason
        else:
            for r, d in zip(rows, detail[bad].tolist()):
                self.errors[r] = reason.format(d)


def _slow_varint(raw: bytes, p: int, end: int) -> tuple[int | None, int, str]:
    """A varint of any length at p, as fastavro reads it: (value, end) or (None, _, reason)."""
    acc = shift = 0
    while True:
        if p >= end:
            return None, p, "truncated"
        c = raw[p]
        p += 1
        acc |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            break
    if acc >> 64:
        return None, p, "varint past 64 bits"
    return acc, p, ""


def _read_long(b: _Batch, idx: np.ndarray, pos: np.ndarray, path: str):
    """Zig-zag varints at pos: (surviving idx, int64 values, positions after them)."""
    buf = b.buf
    b0 = buf[pos]
    multi = b0 >= 0x80
    u = b0.astype(np.uint64)
    if not multi.any():
        newpos = pos + 1
        bad = newpos > b.end[idx]
        if bad.any():
            b.fail(idx, bad, f"truncated in {path}")
            keep = ~bad
            idx, u, newpos = idx[keep], u[keep], newpos[keep]
    else:
        ln = np.ones(len(pos), np.int64)
        m = np.flatnonzero(multi)
        w = b.win10[pos[m]]
        term = w < 0x80
        first = term.argmax(1)
        found = term[np.arange(len(m)), first]
        g = (w & 0x7F).astype(np.uint64)
        g[_AR10 > first[:, None]] = 0
        u[m] = (g << _SHIFTS).sum(1, dtype=np.uint64)
        ln[m] = first + 1
        over = np.zeros(len(pos), bool)
        over[m] = (first == 9) & (w[:, 9] > 1)
        newpos = pos + ln
        end = b.end[idx]
        trunc = newpos > end
        if not found.all():  # no terminator within ten bytes: zero-padded past ten, truncated or too big
            raw = b.raw
            for j in m[~found].tolist():
                value, p, reason = _slow_varint(raw, int(pos[j]), int(end[j]))
                trunc[j] = reason == "truncated"
                over[j] = reason == "varint past 64 bits"
                if value is not None:
                    u[j], newpos[j] = value, p
        bad = trunc | over
        if bad.any():
            b.fail(idx, trunc, f"truncated in {path}")
            b.fail(idx, over & ~trunc, f"varint past 64 bits in {path}")
            keep = ~bad
            idx, u, newpos = idx[keep], u[keep], newpos[keep]
    val = (u >> np.uint64(1)).view(np.int64) ^ -(u & np.uint64(1)).view(np.int64)
    return idx, val, newpos


class _Node:
    path = ""
    nullable_ctx = False  # under a [null, X] union (itself or an ancestor): the leaf may be null

    def leaves(self):
        return [self]


class _Null(_Node):
    def decode(self, b, idx, pos):
        return idx, pos

    def values(self, b, rows):
        return [None] * len(rows)

    def columns(self, b, rows, absent, out):
        pass


class _Leaf(_Node):
    """A leaf: decode stores its arrays (scattered by row) in b.slots[slot]."""

    slot = 0

    def store(self, b, idx, vals, dtype):
        full = np.zeros(b.n, dtype)
        full[idx] = vals
        b.slots[self.slot] = full
        if self.nullable_ctx:
            seen = np.zeros(b.n, bool)
            seen[idx] = True
            b.seen[self.slot] = seen

    def present_rows(self, b, rows):
        return rows[b.seen[self.slot][rows]] if self.nullable_ctx else rows

    def emit(self, rows, absent, col, out, fill):
        if absent is not None and absent.any():
            col[absent] = fill
        out[self.path] = col
        if absent is not None:
            out[self.path + "?"] = absent
        elif self.nullable_ctx:
            out[self.path + "?"] = np.zeros(len(rows), bool)


class _Long(_Leaf):
    """int and long, plain or as a timestamp or date."""

    def __init__(self, logical: str | None):
        self.logical = logical

    def decode(self, b, idx, pos):
        idx, val, pos = _read_long(b, idx, pos, self.path)
        lg = self.logical
        if lg is not None:
            if lg.endswith("millis"):
                bad = (val < _MIN_US // 1000) | (val > _MAX_US // 1000)
            elif lg.endswith("micros"):
                bad = (val < _MIN_US) | (val > _MAX_US)
            else:
                bad = (val < _MIN_DAY) | (val > _MAX_DAY)
            if bad.any():
                b.fail(idx, bad, f"{'date' if lg == 'date' else 'timestamp'} out of range in {self.path}")
                keep = ~bad
                idx, val, pos = idx[keep], val[keep], pos[keep]
        self.store(b, idx, val, np.int64)
        return idx, pos

    def values(self, b, rows):
        v = b.slots[self.slot][rows]
        lg = self.logical
        if lg is None:
            return v.tolist()
        if lg == "date":
            return v.astype("datetime64[D]").tolist()
        us = v * 1000 if lg.endswith("millis") else v
        if lg.startswith("local-"):
            return us.astype("datetime64[us]").tolist()
        return _aware_datetimes(us)

    def columns(self, b, rows, absent, out):
        v = b.slots[self.slot][rows]
        if self.logical is not None and self.logical.endswith("micros"):
            col = _micros_to_ms(v)
        else:
            col = v.astype(np.float64)
        self.emit(rows, absent, col, out, np.nan)


def _micros_to_ms(us: np.ndarray) -> np.ndarray:
    """us / 1000 rounded once (as Python's int / int): beyond 2**53 the float of us would round first."""
    whole, part = np.divmod(us, 1000)
    return np.where(np.abs(us) < 2**53, us / 1000.0, whole + part / 1000.0)


def _aware_datetimes(us: np.ndarray) -> list[datetime]:
    """epoch + timedelta(microseconds=us) for each (UTC), made from datetime's 10-byte pickle state: faster."""
    days, t = np.divmod(us, 86_400_000_000)
    y, mo, dd = _civil(days)
    st = np.empty((len(us), 10), np.uint8)
    st[:, 0], st[:, 1], st[:, 2], st[:, 3] = y >> 8, y & 255, mo, dd
    st[:, 4], st[:, 5], st[:, 6] = t // 3_600_000_000, t // 60_000_000 % 60, t // 1_000_000 % 60
    micro = t % 1_000_000
    st[:, 7], st[:, 8], st[:, 9] = micro >> 16, (micro >> 8) & 255, micro & 255
    s = st.tobytes()
    return [datetime(s[i:i + 10], _UTC) for i in range(0, len(s), 10)]


def _civil(days: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(year, month, day) of days since 1970-01-01 in the proleptic Gregorian calendar (H. Hinnant's algorithm)."""
    era, doe = np.divmod(days + 719_468, 146_097)
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = np.where(mp < 10, mp + 3, mp - 9)
    return yoe + era * 400 + (month <= 2), month, day


class _Boolean(_Leaf):
    def decode(self, b, idx, pos):
        byte = b.buf[pos]
        pos = pos + 1
        trunc = pos > b.end[idx]
        bad = trunc | (byte > 1)
        if bad.any():
            b.fail(idx, trunc, f"truncated in {self.path}")
            b.fail(idx, bad & ~trunc, "bad boolean byte 0x{:02x} in " + self.path, byte)
            keep = ~bad
            idx, byte, pos = idx[keep], byte[keep], pos[keep]
        self.store(b, idx, byte, np.uint8)
        return idx, pos

    def values(self, b, rows):
        return b.slots[self.slot][rows].astype(bool).tolist()

    def columns(self, b, rows, absent, out):
        self.emit(rows, absent, b.slots[self.slot][rows].astype(np.float64), out, np.nan)


class _Float(_Leaf):
    def __init__(self, size: int):
        self.size = size

    def decode(self, b, idx, pos):
        newpos = pos + self.size
        trunc = newpos > b.end[idx]
        if trunc.any():
            b.fail(idx, trunc, f"truncated in {self.path}")
            keep = ~trunc
            idx, pos, newpos = idx[keep], pos[keep], newpos[keep]
        if self.size == 8:
            v = b.win8[pos].view("<f8").ravel()
        else:
            v = b.win8[pos][:, :4].copy().view("<f4").ravel()
        self.store(b, idx, v, np.float64)
        return idx, newpos

    def values(self, b, rows):
        return b.slots[self.slot][rows].tolist()

    def columns(self, b, rows, absent, out):
        self.emit(rows, absent, b.slots[self.slot][rows], out, np.nan)


class _Span(_Leaf):
    """string, bytes and fixed (and decimals on them): stored as (offsets, lengths) into the buffer by row."""

    def __init__(self, kind: str, size: int | None = None, logical: str | None = None,
                 precision: int = 0, scale: int = 0):
        self.kind, self.size, self.logical, self.precision, self.scale = kind, size, logical, precision, scale
        if logical == "decimal":
            self.context = decimal.Context(prec=precision)

    def decode(self, b, idx, pos):
        if self.size is None:
            idx, ln, pos = _read_long(b, idx, pos, self.path)
            room = b.end[idx] - pos
            neg, trunc = ln < 0, ln > room
            bad = neg | trunc
            if bad.any():
                b.fail(idx, neg, "negative length {} in " + self.path, ln)
                b.fail(idx, trunc, "truncated in " + self.path)
                keep = ~bad
                idx, ln, pos = idx[keep], ln[keep], pos[keep]
        else:
            ln = np.full(len(idx), self.size, np.int64)
            trunc = pos + self.size > b.end[idx]
            if trunc.any():
                b.fail(idx, trunc, f"truncated in {self.path}")
                keep = ~trunc
                idx, ln, pos = idx[keep], ln[keep], pos[keep]
        self.store(b, idx, pos, np.int64)
        lengths = np.zeros(b.n, np.int64)
        lengths[idx] = ln
        b.slots[self.slot] = (b.slots[self.slot], lengths, None)
        return idx, pos + ln

    def spans(self, b, rows) -> tuple[list[int], list[int]]:
        off, ln, _ = b.slots[self.slot]
        o = off[rows]
        return o.tolist(), (o + ln[rows]).tolist()

    def check(self, b, rows):
        """Decode the strings (and uuids) of rows, keep them, and return the rows that fail (or None)."""
        rows = self.present_rows(b, rows)
        texts = self._few_short_texts(b, rows) if len(rows) >= 64 and self.logical is None else None
        bad = None
        if texts is None:
            starts, ends = self.spans(b, rows)
            raw = b.raw
            try:
                texts = [raw[s:e].decode() for s, e in zip(starts, ends)]
            except UnicodeDecodeError:
                texts, bad = [], []
                for r, s, e in zip(rows.tolist(), starts, ends):
                    try:
                        texts.append(raw[s:e].decode())
                    except UnicodeDecodeError:
                        texts.append(None)
                        bad.append(r)
                        b.errors[r] = f"invalid UTF-8 in {self.path}"
            if self.logical == "uuid":
                objs = []
                for r, t in zip(rows.tolist(), texts):
                    try:
                        objs.append(None if t is None else uuid.UUID(t))
                    except ValueError:
                        objs.append(None)
                        bad = [] if bad is None else bad
                        bad.append(r)
                        b.errors[r] = f"not a UUID in {self.path}"
                texts = objs
            texts = np.fromiter(texts, object, len(texts))
        off, ln, _ = b.slots[self.slot]
        b.slots[self.slot] = (off, ln, (rows, texts))
        return None if bad is None else np.array(bad, np.int64)

    def _few_short_texts(self, b, rows) -> np.ndarray | None:
        """The strings of rows when all are at most 7 bytes and at most a quarter distinct, decoding each once."""
        off, ln, _ = b.slots[self.slot]
        o, n = off[rows], ln[rows]
        if n.max() > 7:
            return None
        key = (b.win8[o].view("<u8").ravel() & _LOW_BYTES[n]) | (n.astype(np.uint64) << np.uint64(56))
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        if len(first) * 4 > len(rows):
            return None
        raw = b.raw
        try:
            distinct = [raw[s:e].decode() for s, e in zip(o[first].tolist(), (o + n)[first].tolist())]
        except UnicodeDecodeError:
            return None  # the careful path says which rows
        return np.fromiter(distinct, object, len(distinct))[inverse.ravel()]

    def text_array(self, b, rows) -> np.ndarray:
        """The decoded strings (or UUIDs) of rows (all present), an object array."""
        checked, texts = b.slots[self.slot][2]
        if rows is checked or (len(rows) == len(checked) and np.array_equal(rows, checked)):
            return texts
        return texts[np.searchsorted(checked, rows)]

    def objects(self, b, rows) -> list:
        """The values of rows (all present) as fastavro returns them."""
        if self.kind == "string":
            return self.text_array(b, rows).tolist()
        raw = b.raw
        starts, ends = self.spans(b, rows)
        if self.logical != "decimal":
            return [raw[s:e] for s, e in zip(starts, ends)]
        ctx, frm, scale = self.context, int.from_bytes, -self.scale
        make = ctx.create_decimal  # as fastavro: Context(prec=precision).create_decimal(unscaled).scaleb(-scale)
        return [make(frm(raw[s:e], "big", signed=True)).scaleb(scale, ctx) for s, e in zip(starts, ends)]

    def values(self, b, rows):
        return self.objects(b, rows)

    def columns(self, b, rows, absent, out):
        if self.logical == "decimal":
            present = rows if absent is None else rows[~absent]
            col = np.full(len(rows), np.nan)
            if absent is None:
                col = self._decimal_floats(b, rows)
            else:
                col[~absent] = self._decimal_floats(b, present)
            self.emit(rows, absent, col, out, np.nan)
            return
        present = rows if absent is None else rows[~absent]
        if self.kind == "string" and self.logical is None:
            objs = self.text_array(b, present)
        else:
            objs = self.objects(b, present)
            if self.logical == "uuid":
                objs = [str(u) for u in objs]
            objs = np.fromiter(objs, object, len(objs))
        if absent is None:
            col = objs
        else:
            col = np.empty(len(rows), object)
            col[~absent] = objs
        self.emit(rows, absent, col, out, None)

    def _decimal_floats(self, b, rows) -> np.ndarray:
        """float(value) of each decimal; without Decimal for short ones that round exactly."""
        off, ln, _ = b.slots[self.slot]
        o, n = off[rows], ln[rows]
        w = b.win8[o].astype(np.int64)
        k = np.arange(8)
        shift = 8 * (n[:, None] - 1 - k)
        parts = np.where(k < n[:, None], w << np.maximum(shift, 0), 0)
        v = parts.sum(1)
        neg = (n > 0) & (w[:, 0] >= 0x80)
        v = np.where(neg, v - (np.int64(1) << (8 * np.minimum(n, 7))), v)
        fast = (n <= 6) & (np.abs(v) < min(10 ** min(self.precision, 18), 2 ** 53)) & (self.scale <= 22)
        col = v / 10.0 ** self.scale
        slow = np.flatnonzero(~fast)
        if len(slow):
            col[slow] = [float(d) for d in self.objects(b, rows[slow])]
        return col


class _Enum(_Leaf):
    def __init__(self, symbols: list[str]):
        self.symbols = symbols
        self.symbol_array = np.array(symbols + [None], dtype=object)  # and None for absent rows

    def decode(self, b, idx, pos):
        idx, val, pos = _read_long(b, idx, pos, self.path)
        bad = (val < 0) | (val >= len(self.symbols))
        if bad.any():
            b.fail(idx, bad, "bad enum index {} in " + self.path, val)
            keep = ~bad
            idx, val, pos = idx[keep], val[keep], pos[keep]
        self.store(b, idx, val, np.int64)
        return idx, pos

    def values(self, b, rows):
        return self.symbol_array[b.slots[self.slot][rows]].tolist()

    def columns(self, b, rows, absent, out):
        v = b.slots[self.slot][rows]
        if absent is not None:
            v = np.where(absent, len(self.symbols), v)
        out[self.path] = self.symbol_array[v]
        if absent is not None or self.nullable_ctx:
            out[self.path + "?"] = absent if absent is not None else np.zeros(len(rows), bool)


class _Record(_Node):
    def __init__(self, fields: list[tuple[str, _Node]]):
        self.fields = fields
        names = [name for name, _ in fields]
        if not names:
            self.build = lambda cols, n: [{} for _ in range(n)]
        else:
            args = ", ".join(f"a{i}" for i in range(len(names)))
            body = ", ".join(f"{name!r}: a{i}" for i, name in enumerate(names))
            comma = "," if len(names) == 1 else ""
            make = eval(f"lambda cols: [{{{body}}} for {args}{comma} in zip(*cols)]")  # noqa: S307 (names are repr'd)
            self.build = lambda cols, n: make(cols)

    def leaves(self):
        return [leaf for _, node in self.fields for leaf in node.leaves()]

    def decode(self, b, idx, pos):
        for _, node in self.fields:
            idx, pos = node.decode(b, idx, pos)  # (also when no rows are left: every node stores its arrays)
        return idx, pos

    def values(self, b, rows):
        return self.build([node.values(b, rows) for _, node in self.fields], len(rows))

    def columns(self, b, rows, absent, out):
        for _, node in self.fields:
            node.columns(b, rows, absent, out)


class _Nullable(_Node):
    """A union of null and one other type; null_first says which branch (0 or 1) is null."""

    slot = 0

    def __init__(self, inner: _Node, null_first: bool):
        self.inner, self.null_branch = inner, 0 if null_first else 1

    def leaves(self):
        return self.inner.leaves()

    def decode(self, b, idx, pos):
        idx, branch, pos = _read_long(b, idx, pos, self.path)
        bad = (branch < 0) | (branch > 1)
        if bad.any():
            b.fail(idx, bad, "bad union branch {} in " + self.path, branch)
            keep = ~bad
            idx, branch, pos = idx[keep], branch[keep], pos[keep]
        nulls = branch == self.null_branch
        present = np.zeros(b.n, bool)
        b.slots[self.slot] = present
        some = ~nulls
        sub_idx, sub_pos = self.inner.decode(b, idx[some], pos[some])
        present[sub_idx] = True
        if not nulls.any():
            return sub_idx, sub_pos
        return np.concatenate([idx[nulls], sub_idx]), np.concatenate([pos[nulls], sub_pos])

    def values(self, b, rows):
        present = b.slots[self.slot][rows]
        if present.all():
            return self.inner.values(b, rows)
        inner = iter(self.inner.values(b, rows[present]))
        return [next(inner) if p else None for p in present.tolist()]

    def columns(self, b, rows, absent, out):
        missing = ~b.slots[self.slot][rows]
        self.inner.columns(b, rows, missing if absent is None else absent | missing, out)


class BatchDecoder:
    """Decodes a batch of Avro binary values of one record schema, field by field over all of them at once."""

    def __init__(self, schema: dict):
        if not isinstance(schema, dict) or schema.get("type") != "record":
            raise Unsupported("the schema must be a record")
        fastavro.parse_schema(schema)  # fastavro's own checks (names, decimal precision and scale, ...)
        self.schema = schema
        self.root = self._compile(schema, "", False)
        nslots = 0
        for node in self._walk(self.root):
            node.slot = nslots
            nslots += 1
        self._nslots = nslots
        self._checked = [leaf for leaf in self.root.leaves() if isinstance(leaf, _Span) and leaf.kind == "string"]

    def _walk(self, node):
        yield node
        if isinstance(node, _Record):
            for _, child in node.fields:
                yield from self._walk(child)
        elif isinstance(node, _Nullable):
            yield from self._walk(node.inner)

    def _compile(self, t, path: str, nullable: bool) -> _Node:
        where = path or "the record"
        if isinstance(t, list):
            branches = [x["type"] if isinstance(x, dict) and x.get("type") == "null" else x for x in t]
            nulls = [x == "null" for x in branches]
            if len(t) != 2 or sum(nulls) != 1:
                raise Unsupported(f"{where}: only unions of null and one other type are compiled, not {t!r}")
            inner = t[1] if nulls[0] else t[0]
            if isinstance(inner, list):
                raise Unsupported(f"{where}: a union inside a union")
            node = _Nullable(self._compile(inner, path, True), nulls[0])
            node.path, node.nullable_ctx = path, True
            return node
        if isinstance(t, str):
            if t not in _PRIMITIVES:
                raise Unsupported(f"{where}: reference to the named type {t!r}")
            t = {"type": t}
        if not isinstance(t, dict):
            raise Unsupported(f"{where}: {t!r}")
        kind = t.get("type")
        if isinstance(kind, (dict, list)):
            return self._compile(kind, path, nullable)
        logical = t.get("logicalType")
        if f"{kind}-{logical}" in fastavro.read.LOGICAL_READERS and f"{kind}-{logical}" not in _LOGICAL:
            raise Unsupported(f"{where}: logical type {logical} on {kind}")  # fastavro converts it, we do not
        node: _Node
        if kind in ("record", "error"):
            fields = []
            for f in t.get("fields", []):
                fields.append((f["name"], self._compile(f["type"], f"{path}.{f['name']}" if path else f["name"],
                                                        nullable)))
            node = _Record(fields)
        elif kind == "null":
            node = _Null()
        elif kind == "boolean":
            node = _Boolean()
        elif kind in ("int", "long"):
            node = _Long(logical if f"{kind}-{logical}" in _LOGICAL else None)
        elif kind in ("float", "double"):
            node = _Float(4 if kind == "float" else 8)
        elif kind in ("string", "bytes"):
            lg = logical if f"{kind}-{logical}" in _LOGICAL else None
            node = _Span(kind, None, lg, t.get("precision", 0), t.get("scale", 0))
        elif kind == "fixed":
            lg = logical if f"{kind}-{logical}" in _LOGICAL else None
            node = _Span("fixed", int(t["size"]), lg, t.get("precision", 0), t.get("scale", 0))
        elif kind == "enum":
            node = _Enum(list(t["symbols"]))
        elif kind in ("array", "map"):
            raise Unsupported(f"{where}: {kind} types are not compiled")
        else:
            raise Unsupported(f"{where}: type {kind!r}")
        node.path, node.nullable_ctx = path, nullable
        return node

    def _run(self, values: Sequence[bytes]) -> tuple[_Batch, np.ndarray]:
        """Decode the batch: its state and the sorted rows that hold exactly one valid record."""
        b = _Batch(values, self._nslots)
        idx = np.arange(b.n, dtype=np.int64)
        if b.errors:
            idx = idx[~np.isin(idx, list(b.errors))]
        idx, pos = self.root.decode(b, idx, b.start[idx])
        trailing = pos != b.end[idx]
        if trailing.any():
            b.fail(idx, trailing, "trailing bytes ({} after the record)", b.end[idx] - pos)
            idx = idx[~trailing]
        rows = np.sort(idx)
        for leaf in self._checked:
            bad = leaf.check(b, rows)
            if bad is not None and len(bad):
                rows = rows[~np.isin(rows, bad)]
        return b, rows

    def decode(self, values: Sequence[bytes]) -> tuple[list[dict | None], dict[int, str]]:
        """Decode each value as one record of the schema; returns (records, errors) where records[i] is the dict
        fastavro.schemaless_reader(io.BytesIO(values[i]), fastavro.parse_schema(schema), None) would return, or None
        when values[i] is not exactly one record (then errors[i] is a one-line reason: truncated, trailing bytes,
        bad union branch, bad enum index, invalid UTF-8, varint past 64 bits, bad boolean byte...)."""
        b, rows = self._run(values)
        records: list[dict | None] = [None] * b.n
        for r, record in zip(rows.tolist(), self.root.values(b, rows)):
            records[r] = record
        return records, dict(sorted(b.errors.items()))

    def columns(self, values: Sequence[bytes]) -> tuple[dict[str, np.ndarray], np.ndarray, dict[int, str]]:
        """The fast path the worker will use: for every leaf field (dotted path, e.g. "merchant.mcc") a numpy column
        over the rows that decoded (float64 for int/long/float/double/boolean/decimal/timestamps-as-epoch-ms-float,
        object arrays of str for string/enum, a bool mask column "<path>?" telling null for nullable leaves),
        plus the array of row indices that decoded, plus errors for the others.

        Also: dates are float64 days since 1970-01-01, uuids their canonical str, bytes and fixed object arrays of
        bytes; a null-typed field has no column. Null entries are NaN (float64) or None (object)."""
        b, rows = self._run(values)
        out: dict[str, np.ndarray] = {}
        self.root.columns(b, rows, None, out)
        return out, rows, dict(sorted(b.errors.items()))
