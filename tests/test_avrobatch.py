"""The schema-compiled batch decoder (worker/avro/avrobatch.py) agrees with fastavro, record for record, on any input."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import fastavro
import numpy as np
import pytest
from fastavro import _read_py
from fastavro.io.binary_decoder import BinaryDecoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.avro.avrobatch import BatchDecoder, Unsupported

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = settings(max_examples=200, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LONG = (-(2**63), 2**63 - 1)
FASTAVRO_ERRORS = (EOFError, IndexError, ValueError, OverflowError, UnicodeDecodeError, TypeError, KeyError)
TS_LOGICAL = ["timestamp-millis", "timestamp-micros", "local-timestamp-millis", "local-timestamp-micros"]


# ---- the reference: fastavro, strict where it reads what no writer wrote ------------------------------------


class _StrictDecoder(BinaryDecoder):
    """fastavro's pure-Python decoder refusing what no Avro writer produces, and noting where each varint is."""

    def __init__(self, fo):
        super().__init__(fo)
        self.varints: list[tuple[int, int]] = []

    def read_boolean(self):
        data = self.fo.read(1)
        if data not in (b"\x00", b"\x01"):
            raise ValueError("bad boolean byte")
        return data == b"\x01"

    def read_long(self):
        start = self.fo.tell()
        value = super().read_long()
        if not -(2**63) <= value < 2**63:
            raise OverflowError("varint past 64 bits")
        self.varints.append((start, self.fo.tell()))
        return value

    read_int = read_long

    def read_enum(self):
        index = self.read_long()
        if index < 0:
            raise IndexError("negative enum index")
        return index

    def read_index(self):
        index = self.read_long()
        if index < 0:
            raise IndexError("negative union branch")
        return index


def strict_read(schema: dict, value: bytes) -> tuple[dict, list[tuple[int, int]]] | None:
    """fastavro's record (C reader) if it reads all of value and the strict reader accepts it too, with the
    varint spans; else None."""
    parsed = fastavro.parse_schema(schema)
    fo = io.BytesIO(value)
    try:
        record = fastavro.schemaless_reader(fo, parsed, None)
    except FASTAVRO_ERRORS:
        return None
    if fo.tell() != len(value):
        return None
    named = _read_py._default_named_schemas()
    fo = io.BytesIO(value)
    decoder = _StrictDecoder(fo)
    try:
        _read_py.read_data(decoder, _read_py.parse_schema(schema, named["writer"]), named, None,
                           {"handle_unicode_errors": "strict"})
    except FASTAVRO_ERRORS:
        return None
    assert fo.tell() == len(value)
    return record, decoder.varints


def same(a, b) -> bool:
    """Equal, types included, NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, Decimal):
        return a.as_tuple() == b.as_tuple()
    return a == b


def check_batch(schema: dict, values: list[bytes]) -> list:
    """Assert decode() and columns() accept exactly what strict fastavro reads, with its values; return those."""
    decoder = BatchDecoder(schema)
    records, errors = decoder.decode(values)
    expected = [strict_read(schema, v) for v in values]
    expected = [None if e is None else e[0] for e in expected]
    assert len(records) == len(values)
    for i, (got, want) in enumerate(zip(records, expected)):
        if want is None:
            assert got is None and i in errors and "\n" not in errors[i], (i, got, values[i])
        else:
            assert same(got, want), (i, got, want)
            assert i not in errors
    columns, rows, col_errors = decoder.columns(values)
    assert rows.tolist() == [i for i, e in enumerate(expected) if e is not None]
    assert col_errors == errors
    want_columns = expected_columns(schema, [expected[i] for i in rows.tolist()])
    assert columns.keys() == want_columns.keys()
    for name, want in want_columns.items():
        have = columns[name]
        assert have.dtype == (bool if name.endswith("?") else np.float64 if want[1] else object), name
        assert len(have) == len(rows) and all(same(h, w) for h, w in zip(have.tolist(), want[0])), (name, have, want)
    return expected


EPOCH, EPOCH_DAY = datetime(1970, 1, 1, tzinfo=timezone.utc), date(1970, 1, 1)


def _column_value(v):
    """A record's leaf value as columns() holds it: (value, whether the column is float64)."""
    if isinstance(v, datetime):  # epoch ms, local-timestamp-* taken as UTC; from whole micros, rounded once
        micros = (v.replace(tzinfo=timezone.utc) - EPOCH) // timedelta(microseconds=1)
        return (micros / 1000 if micros % 1000 else float(micros // 1000)), True
    if isinstance(v, date):
        return float((v - EPOCH_DAY).days), True
    if isinstance(v, (bool, int, float, Decimal)):
        return float(v), True
    if isinstance(v, uuid.UUID):
        return str(v), False
    return v, False


def expected_columns(schema: dict, records: list[dict]) -> dict[str, tuple[list, bool]]:
    """What columns() should return for these records: path -> (values, float64 or not), and the null masks."""
    out: dict[str, tuple[list, bool]] = {}

    def walk(t, path, getters, nullable):
        if isinstance(t, list):
            return walk(t[1] if t[0] == "null" else t[0], path, getters, True)
        kind = t if isinstance(t, str) else t["type"]
        if kind == "null":
            return
        if kind == "record":
            for f in t["fields"]:
                walk(f["type"], f"{path}.{f['name']}" if path else f["name"], getters + [f["name"]], nullable)
            return
        values = []
        for r in records:
            for name in getters:
                r = None if r is None else r[name]
            values.append(r)
        is_float = kind in ("boolean", "int", "long", "float", "double") or (
            isinstance(t, dict) and t.get("logicalType") == "decimal")
        out[path] = ([(math.nan if is_float else None) if v is None else _column_value(v)[0] for v in values],
                     is_float)
        if nullable:
            out[path + "?"] = ([v is None for v in values], False)

    walk(schema, "", [], False)
    return out


# ---- random schemas and records -------------------------------------------------------------------------------

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)


@st.composite
def decimal_type(draw):
    scale_precision = draw(st.integers(1, 30))
    scale = draw(st.integers(0, scale_precision))
    if draw(st.booleans()):
        return {"type": "bytes", "logicalType": "decimal", "precision": scale_precision, "scale": scale}
    size = draw(st.integers(1, 16))
    precision = min(scale_precision, len(str(2 ** (8 * size - 1) - 1)) - 1) or 1
    return {"type": "fixed", "name": "_", "size": size, "logicalType": "decimal", "precision": precision,
            "scale": min(scale, precision)}


leaf_types = st.one_of(
    *(st.just(name) for name in ["null", "boolean", "int", "long", "float", "double", "string", "bytes"]),
    st.sampled_from(TS_LOGICAL).map(lambda lg: {"type": "long", "logicalType": lg}),
    st.just({"type": "int", "logicalType": "date"}),
    st.just({"type": "string", "logicalType": "uuid"}),
    st.just({"type": "long", "logicalType": "some-unknown-type"}),
    decimal_type(),
    st.lists(names, min_size=1, max_size=5, unique=True).map(lambda s: {"type": "enum", "name": "_", "symbols": s}),
    st.integers(0, 12).map(lambda n: {"type": "fixed", "name": "_", "size": n}),
)


def types(depth: int):
    """A field type: a leaf, a nullable union, or (while depth lasts) a nested record."""
    inner = leaf_types if depth == 0 else st.one_of(leaf_types, record_type(depth - 1))
    nonnull = inner.filter(lambda t: t != "null")
    return st.one_of(inner, inner, nonnull.map(lambda t: ["null", t]), nonnull.map(lambda t: [t, "null"]))


def record_type(depth: int):
    return st.lists(st.tuples(names, st.deferred(lambda: types(depth))), max_size=6,
                    unique_by=lambda f: f[0]).map(
        lambda fields: {"type": "record", "name": "_", "fields": [{"name": n, "type": t} for n, t in fields]})


def _named(schema, counter=None):
    """schema with every named type given a name of its own (the strategies call them all "_")."""
    counter = counter if counter is not None else [0]
    if isinstance(schema, list):
        return [_named(t, counter) for t in schema]
    if isinstance(schema, dict):
        out = dict(schema)
        if "name" in out:
            counter[0] += 1
            out["name"] = f"T{counter[0]}"
        if "fields" in out:
            out["fields"] = [{**f, "type": _named(f["type"], counter)} for f in out["fields"]]
        return out
    return schema


schemas = record_type(3).map(_named)


def value_of(t):
    """A strategy for values fastavro writes for type t (some of which fastavro cannot read back)."""
    if isinstance(t, list):
        other = t[0] if t[1] == "null" else t[1]
        return st.one_of(st.none(), value_of(other))
    if isinstance(t, str):
        t = {"type": t}
    kind, logical = t["type"], t.get("logicalType")
    if kind == "record":
        return st.fixed_dictionaries({f["name"]: value_of(f["type"]) for f in t["fields"]})
    if logical in TS_LOGICAL:
        lo, hi = (-62_135_596_800_000_000, 253_402_300_799_999_999) if logical.endswith("micros") else \
            (-62_135_596_800_000, 253_402_300_799_999)  # datetime.min and .max (UTC) from the epoch
        return st.one_of(st.integers(lo, hi), st.integers(lo // 2, lo // 4), st.integers(hi // 4, hi // 2),
                         st.integers(*LONG), st.sampled_from([lo - 1, lo, hi, hi + 1]))
    if logical == "date":
        lo, hi = -719_162, 2_932_896  # 0001-01-01 and 9999-12-31
        return st.one_of(st.integers(lo, hi), st.integers(-(2**31), 2**31 - 1),
                         st.sampled_from([lo - 1, lo, hi, hi + 1]))
    if logical == "uuid":
        return st.one_of(st.uuids(), st.uuids().map(str), st.uuids().map(lambda u: u.hex.upper()), st.text(max_size=40))
    if logical == "decimal":
        if kind == "fixed":  # any bytes: fastavro's writer passes them through
            return st.binary(min_size=t["size"], max_size=t["size"])
        top = 10 ** t["precision"]
        return st.one_of(st.integers(-top + 1, top - 1).map(lambda v: Decimal(v).scaleb(-t.get("scale", 0))),
                         st.binary(max_size=20))  # bytes pass through, also ones with more digits than precision
    return {
        "null": st.none(),
        "boolean": st.booleans(),
        "int": st.integers(-(2**31), 2**31 - 1),
        "long": st.integers(*LONG),
        "float": st.floats(width=32),
        "double": st.floats(),
        "string": st.text(max_size=20),
        "bytes": st.binary(max_size=20),
        "fixed": st.binary(min_size=t.get("size", 0), max_size=t.get("size", 0)),
        "enum": st.sampled_from(t.get("symbols", ["_"])),
    }[kind]


def encode(schema: dict, record: dict) -> bytes:
    fo = io.BytesIO()
    fastavro.schemaless_writer(fo, fastavro.parse_schema(schema), record)
    return fo.getvalue()


@st.composite
def batches(draw, max_size=12):
    """A random schema and a batch of encodings of random records of it."""
    schema = draw(schemas)
    records = draw(st.lists(value_of(schema), min_size=1, max_size=max_size))
    return schema, [encode(schema, r) for r in records]


def zigzag(value: int) -> int:
    return (value << 1) ^ (value >> 63)


def varint(n: int, extra_zero_groups: int = 0, junk_bit: int | None = None) -> bytes:
    """The unsigned varint of n, with extra zero 7-bit groups, optionally with bit junk_bit set (overflow)."""
    groups = []
    while True:
        groups.append(n & 0x7F)
        n >>= 7
        if not n:
            break
    groups += [0] * extra_zero_groups
    if junk_bit is not None:
        groups += [0] * (junk_bit // 7 + 1 - len(groups))
        groups[junk_bit // 7] |= 1 << junk_bit % 7
    return bytes(g | 0x80 for g in groups[:-1]) + bytes(groups[-1:])


def respell_varints(value: bytes, spans, extras, junk=None) -> bytes:
    """value with the varints at spans written with extras[k] extra zero groups (and bit junk[1] of varint junk[0])."""
    out, last = [], 0
    for k, (start, end) in enumerate(spans):
        acc = 0
        for shift, byte in enumerate(value[start:end]):
            acc |= (byte & 0x7F) << (7 * shift)
        out += [value[last:start], varint(acc, extras[k], junk[1] if junk and junk[0] == k else None)]
        last = end
    return b"".join(out) + value[last:]


# ---- tests ----------------------------------------------------------------------------------------------------


@SETTINGS
@given(batches())
def test_random_schemas_decode_as_fastavro(batch):
    """Records of random schemas (nesting, nullable unions, enums, fixed, decimals, timestamps) decode as fastavro."""
    schema, values = batch
    check_batch(schema, values)


@SETTINGS
@given(batches(max_size=6), st.data())
def test_corrupted_values_accepted_exactly_as_fastavro(batch, data):
    """Truncated, overwritten, extended or random values are accepted exactly when fastavro reads all of them."""
    schema, values = batch
    damaged = []
    for v in values:
        how = data.draw(st.sampled_from(["keep", "truncate", "overwrite", "append", "insert", "random"]))
        at = data.draw(st.integers(0, len(v)))
        if how == "truncate":
            v = v[:at]
        elif how == "overwrite" and v:
            at = min(at, len(v) - 1)
            v = v[:at] + data.draw(st.binary(min_size=1, max_size=3)) + v[at + 1:]
        elif how == "append":
            v = v + data.draw(st.binary(min_size=1, max_size=4))
        elif how == "insert":
            v = v[:at] + data.draw(st.binary(min_size=1, max_size=3)) + v[at:]
        elif how == "random":
            v = data.draw(st.binary(max_size=40))
        damaged.append(v)
    expected = check_batch(schema, damaged)
    _, errors = BatchDecoder(schema).decode(damaged)
    for i, (before, after) in enumerate(zip(values, damaged)):
        if after != before and before.startswith(after) and strict_read(schema, before) is not None:
            assert expected[i] is None and errors[i].startswith("truncated in "), (i, errors.get(i))


@SETTINGS
@given(batches(max_size=6), st.data())
def test_zero_padded_varints_decode_as_canonical(batch, data):
    """Varints written with extra zero groups (also past ten bytes) decode to the canonical record's values."""
    schema, values = batch
    padded, canonical = [], []
    for v in values:
        read = strict_read(schema, v)
        if read is None:
            continue
        spans = read[1]
        extras = data.draw(st.lists(st.integers(0, 12), min_size=len(spans), max_size=len(spans)))
        padded.append(respell_varints(v, spans, extras))
        canonical.append(read[0])
    expected = check_batch(schema, padded)
    assert all(same(e, c) for e, c in zip(expected, canonical))


@SETTINGS
@given(batches(max_size=6), st.data())
def test_varints_past_64_bits_are_refused(batch, data):
    """A varint with a bit set past the 64th (which fastavro's C reader wraps around) makes the record an error."""
    schema, values = batch
    spoiled = []
    for v in values:
        read = strict_read(schema, v)
        if read is None or not read[1]:
            continue
        spans = read[1]
        extras = data.draw(st.lists(st.integers(0, 12), min_size=len(spans), max_size=len(spans)))
        junk = (data.draw(st.integers(0, len(spans) - 1)), data.draw(st.integers(64, 64 + 7 * 12)))
        spoiled.append(respell_varints(v, spans, extras, junk))
    expected = check_batch(schema, spoiled)
    assert all(e is None for e in expected)
    _, errors = BatchDecoder(schema).decode(spoiled)
    assert all("past 64 bits" in reason for reason in errors.values())


def test_lenient_fastavro_readings_are_errors():
    """Boolean bytes other than 0/1, negative enum indexes and negative union branches are errors, with reasons."""
    schema = {"type": "record", "name": "R", "fields": [
        {"name": "b", "type": "boolean"},
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A", "B"]}},
        {"name": "u", "type": ["null", "long"]}]}
    values = [b"\x01\x02\x02\x04", b"\x02\x00\x00", b"\x00\x01\x00", b"\x00\x00\x01\x04", b"\x00\x00\x04",
              b"\x00\x04\x00", b"\x01\x02\x00\x00", b"\x01\x02", b"\x00\x00\x02\x80\x80\x00"]
    records, errors = BatchDecoder(schema).decode(values)
    assert records[0] == {"b": True, "e": "B", "u": 2}
    assert records[8] == {"b": False, "e": "A", "u": 0}
    assert [errors.get(i, "").split(" in ")[0] for i in range(len(values))] == [
        "", "bad boolean byte 0x02", "bad enum index -1", "bad union branch -1", "bad union branch 2",
        "bad enum index 2", "trailing bytes (1 after the record)", "truncated", ""]
    check_batch(schema, values)


@pytest.mark.parametrize("bad", [
    {"type": "array", "items": "long"},
    {"type": "map", "values": "string"},
    ["null", "string", "long"],
    ["string", "long"],
    {"type": "int", "logicalType": "time-millis"},
])
def test_unsupported_types_raise(bad):
    """Arrays, maps, other unions and time-of-day types raise Unsupported when the decoder is compiled."""
    with pytest.raises(Unsupported):
        BatchDecoder({"type": "record", "name": "R", "fields": [{"name": "x", "type": bad}]})


def test_named_type_references_raise():
    """A field referring to a named type defined elsewhere (also recursively) raises Unsupported."""
    card = {"type": "record", "name": "Card", "fields": [{"name": "id", "type": "string"}]}
    with pytest.raises(Unsupported):
        BatchDecoder({"type": "record", "name": "R",
                      "fields": [{"name": "a", "type": card}, {"name": "b", "type": "Card"}]})
    with pytest.raises(Unsupported):
        BatchDecoder({"type": "record", "name": "Node", "fields": [{"name": "next", "type": ["null", "Node"]}]})


def _bank_records(n: int, seed: int) -> list[dict]:
    spec = importlib.util.spec_from_file_location("bank_synth", ROOT / "examples" / "bank" / "synth.py")
    synth = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(synth)
    return [record for record, _ in synth.generate(n, seed)]


def test_bank_payments_decode_and_columns():
    """Bank card payments decode as fastavro, and their columns hold the records' numbers, strings and nulls."""
    schema = json.loads((ROOT / "examples" / "bank" / "card_payment.avsc").read_text())
    records = _bank_records(300, 7)
    values = [encode(schema, r) for r in records]
    check_batch(schema, values)
    cols, rows, errors = BatchDecoder(schema).columns(values + [b"\x02"])
    assert rows.tolist() == list(range(300)) and list(errors) == [300]
    assert cols["merchant.mcc"].tolist() == [r["merchant"]["mcc"] for r in records]
    assert cols["amount"].tolist() == [float(r["amount"]) for r in records]
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    micros = [(r["event_time"] - epoch) // timedelta(microseconds=1) for r in records]
    assert cols["event_time"].tolist() == [us / 1000 for us in micros]  # epoch ms, rounded once
    assert cols["channel"].tolist() == [r["channel"] for r in records]
    assert cols["card_present?"].tolist() == [r["card_present"] is None for r in records]
    have = cols["customer_distance_km"]
    assert [None if math.isnan(x) else x for x in have.tolist()] == [r["customer_distance_km"] for r in records]
    assert cols["payment_id"].dtype == object and cols["amount"].dtype == np.float64


def test_nullable_record_columns():
    """Leaves under a nullable record get a null mask; dates, uuids and fixed decimals get their column forms."""
    schema = {"type": "record", "name": "R", "fields": [
        {"name": "m", "type": ["null", {"type": "record", "name": "M", "fields": [
            {"name": "day", "type": {"type": "int", "logicalType": "date"}},
            {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
            {"name": "price", "type": {"type": "fixed", "name": "P", "size": 4, "logicalType": "decimal",
                                       "precision": 9, "scale": 3}}]}]}]}
    u = uuid.UUID(int=12345)
    records = [{"m": None}, {"m": {"day": 3, "id": str(u), "price": Decimal("-1.5")}}]
    values = [encode(schema, r) for r in records]
    check_batch(schema, values)
    cols, rows, _ = BatchDecoder(schema).columns(values)
    assert cols["m.day?"].tolist() == [True, False] and cols["m.day"][1] == 3.0 and math.isnan(cols["m.day"][0])
    assert cols["m.id"].tolist() == [None, str(u)]
    assert cols["m.price"][1] == -1.5


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.one_of(st.text(alphabet="a\x00é", max_size=3), st.text(max_size=4)), min_size=1, max_size=5),
       st.booleans(), st.data())
def test_short_repeated_strings_decode_once_and_agree(words, nullable, data):
    """Batches of many short strings from a few distinct ones (decoded once each) agree with fastavro, damage too."""
    field = ["null", "string"] if nullable else "string"
    schema = {"type": "record", "name": "R", "fields": [{"name": "s", "type": field}, {"name": "n", "type": "int"}]}
    pool = words + ([None] if nullable else [])
    n = data.draw(st.integers(64, 150))
    values = [encode(schema, {"s": data.draw(st.sampled_from(pool)), "n": i}) for i in range(n)]
    for _ in range(data.draw(st.integers(0, 3))):  # a few values with bytes overwritten (bad UTF-8, lengths...)
        i = data.draw(st.integers(0, n - 1))
        at = data.draw(st.integers(0, len(values[i]) - 1))
        values[i] = values[i][:at] + data.draw(st.binary(min_size=1, max_size=2)) + values[i][at + 1:]
    check_batch(schema, values)
