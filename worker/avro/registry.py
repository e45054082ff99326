"""Schema Registry input and output: the Confluent wire format, writer schemas by id, Avro schema resolution.

Wire format (Confluent): magic byte 0, the schema id as a 4-byte big-endian integer, then the Avro binary body.
A writer schema whose Parsing Canonical Form equals the reader's is read as is by the batch codec; any other is
resolved against the reader schema by fastavro (Avro specification, "Schema Resolution") and re-encoded in the
reader schema, so the batch codec and the verdict encoder always see the reader's layout.
"""

from __future__ import annotations

import io
import json
import re
import struct

import fastavro
from cachetools import LRUCache
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient, SchemaRegistryError
from fastavro.schema import to_parsing_canonical_form

from .codec import DecodeError, logical_types, without_logical_types

MAGIC = 0
_HEADER = struct.Struct(">bI")
# Writer schemas kept per worker; a stream rarely carries more than a few versions at once.
WRITER_CACHE_SIZE = 1000


class RegistryUnavailable(RuntimeError):
    """The registry did not answer (or answered 5xx, 401, 403): retry later; nothing is dead-lettered for it."""


def frame(schema_id: int) -> bytes:
    """The 5-byte wire-format header for `schema_id`."""
    return _HEADER.pack(MAGIC, schema_id)


def unframe(value: bytes | None) -> tuple[int, int]:
    """(schema id, body offset) of a wire-format value; DecodeError when it is not in the wire format."""
    if not value or len(value) < _HEADER.size:
        raise DecodeError(f"not in the Confluent wire format: {len(value or b'')} bytes, fewer than the 5-byte header")
    magic, schema_id = _HEADER.unpack_from(value)
    if magic != MAGIC:
        raise DecodeError(f"not in the Confluent wire format: magic byte {magic & 0xFF:#04x}, expected 0x00")
    return schema_id, _HEADER.size


def connect(conf: dict) -> SchemaRegistryClient:
    """A SchemaRegistryClient for `conf` (Settings.registry_config())."""
    return SchemaRegistryClient(conf)


def register(client: SchemaRegistryClient, subject: str, schema: dict) -> int:
    """Register `schema` under `subject` (or find it there); return its id. RegistryUnavailable if unreachable."""
    try:
        return client.register_schema(subject, Schema(json.dumps(schema), "AVRO"))
    except SchemaRegistryError as exc:
        if _transient(exc):
            raise RegistryUnavailable(_describe(exc)) from None
        if exc.http_status_code == 404 and exc.error_code in (None, -1):
            raise ValueError("the URL is not a Confluent-compatible Schema Registry API (for Apicurio, it ends in "
                             "/apis/ccompat/v7)") from None
        raise
    except Exception as exc:  # httpx's transport errors: the registry is away
        raise RegistryUnavailable(_describe(exc)) from None


def input_prefix(conf: dict | None, input_topic: str, schema: dict) -> bytes:
    """The wire-format header of `schema` registered under `<input topic>-value`; empty without a registry."""
    return frame(register(connect(conf), f"{input_topic}-value", schema)) if conf else b""


class _Same:
    """A writer schema with the reader's layout: the body is read as is."""


class _Resolve:
    """A writer schema resolved against the reader by fastavro, record by record."""

    def __init__(self, writer: dict):
        self.writer = writer


class _Refuse:
    """A writer schema that cannot be used: every record written with it is a dead letter with this reason."""

    def __init__(self, reason: str):
        self.reason = reason


class FramedInput:
    """Turns wire-format values into bodies in the reader schema, fetching writer schemas by id (LRU-cached)."""

    def __init__(self, client: SchemaRegistryClient, reader: dict, reader_logical: dict[str, str | None]):
        """`reader` is parsed without logical types (as the batch codec reads it); `reader_logical` names each
        top-level field's logicalType, which a writer schema must match."""
        self.client = client
        self.reader = reader
        self._reader_logical = reader_logical
        self._reader_form = to_parsing_canonical_form(reader)
        self._writers: LRUCache = LRUCache(maxsize=WRITER_CACHE_SIZE)

    def bodies(self, values: list[bytes | None]) -> list[bytes | DecodeError]:
        """Each value's body in the reader schema, or a DecodeError saying why it cannot be read.

        Raises RegistryUnavailable when a writer schema that is not cached cannot be fetched.
        """
        out: list[bytes | DecodeError] = []
        for value in values:
            try:
                schema_id, start = unframe(value)
            except DecodeError as exc:
                out.append(exc)
                continue
            how = self._writers.get(schema_id) or self._fetch(schema_id)
            if isinstance(how, _Same):
                out.append(value[start:])
            elif isinstance(how, _Resolve):
                out.append(self._resolved(value, start, schema_id, how.writer))
            else:
                out.append(DecodeError(how.reason))
        return out

    def _fetch(self, schema_id: int):
        try:
            found = self.client.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if _transient(exc):
                raise RegistryUnavailable(_describe(exc)) from None
            how = _Refuse(f"unknown schema id {schema_id}: {_describe(exc)}")
        except Exception as exc:  # httpx's transport errors: the registry is away
            raise RegistryUnavailable(_describe(exc)) from None
        else:
            how = self._plan(schema_id, found)
        self._writers[schema_id] = how
        return how

    def _plan(self, schema_id: int, found: Schema):
        if (found.schema_type or "AVRO") != "AVRO":
            return _Refuse(f"schema id {schema_id} is a {found.schema_type} schema, not Avro")
        try:
            raw = json.loads(found.schema_str)
            writer = fastavro.parse_schema(without_logical_types(raw))
        except Exception as exc:
            return _Refuse(f"schema id {schema_id} is not a valid Avro schema: {exc}")
        if writer.get("type") != "record":
            return _Refuse(f"schema id {schema_id} is a {writer.get('type')}, not a record")
        for name, logical in logical_types(raw).items():
            # Logical types annotate; only two that disagree (micros against millis) would change a value's meaning.
            if logical and self._reader_logical.get(name) and logical != self._reader_logical[name]:
                return _Refuse(f"writer schema id {schema_id} cannot be resolved against the reader schema: field {name} "
                               f"is {logical} there and {self._reader_logical[name]} in the reader")
        return _Same() if to_parsing_canonical_form(writer) == self._reader_form else _Resolve(writer)

    def _resolved(self, value: bytes, start: int, schema_id: int, writer: dict) -> bytes | DecodeError:
        body = io.BytesIO(value)
        body.seek(start)
        try:
            record = fastavro.schemaless_reader(body, writer, self.reader)
        except fastavro.read.SchemaResolutionError as exc:
            return DecodeError(f"writer schema id {schema_id} cannot be resolved against the reader schema: {exc}")
        except Exception as exc:  # fastavro raises what the bytes provoke (EOFError, IndexError, UnicodeError, …)
            return DecodeError(f"not a record of writer schema id {schema_id}: {type(exc).__name__}: {exc}")
        if body.tell() != len(value):
            return DecodeError(f"{len(value) - body.tell()} trailing bytes after a record of writer schema id {schema_id}")
        out = io.BytesIO()
        try:
            fastavro.schemaless_writer(out, self.reader, record)
        except Exception as exc:
            return DecodeError(f"a record of writer schema id {schema_id} does not fit the reader schema: {exc}")
        return out.getvalue()


def _transient(exc: SchemaRegistryError) -> bool:
    """Server errors and refused credentials are not the record's fault: wait for them instead of dead-lettering."""
    return exc.http_status_code in (401, 403, 408, 429) or exc.http_status_code >= 500


def _describe(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    # httpx names the URL it failed on, user:password included when the URL carries them.
    return f"{type(exc).__name__}: {_USERINFO.sub('://***@', text[0][:300]) if text else ''}"


_USERINFO = re.compile(r"://[^/\s]*@")
