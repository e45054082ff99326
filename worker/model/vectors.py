"""Test vectors: rows a manifest carries with the probability each must score, checked through the live path."""

from __future__ import annotations

import io
import json
from decimal import Decimal
from pathlib import Path

import fastavro
from fastavro.validation import validate

from ..avro.codec import Codec
from ..avro.recordcodec import RecordCodec
from ..records import Envelope
from ..scoring import Scorer, score_batch
from .manifest import ManifestError, TestVector

_VECTOR_TOPIC = "test-vectors"
NEUTRAL_TIME_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z: the event time of a vector that does not give one
_NEUTRAL = object()


def check_test_vectors(scorer: Scorer, codec: Codec | RecordCodec) -> None:
    """Score the manifest's test vectors as encoded records through `score_batch`, the live path.

    Raises ManifestError in one line naming the first row that becomes a dead letter or whose probability differs
    from the manifest's by more than its tolerance.
    """
    m = scorer.manifest
    if not m.test_vectors:
        return
    schema = codec.transaction_avsc
    where = f"model manifest {m.path or m.name}"
    messages = []
    for i, v in enumerate(m.test_vectors):
        try:
            value = encode_record(schema, v.inputs, f"test-vector-{i}", m.event_time_field)
        except Exception as exc:  # fastavro raises what the values provoke (ValueError, TypeError, …)
            reason = " ".join(str(exc).replace('"', "").split()).strip("[] ")
            raise ManifestError(f"{where}: test vector {i} is not a {schema.get('name')} record: {reason}") from None
        messages.append(Envelope(_VECTOR_TOPIC, 0, i, None, value))
    outcome = score_batch(messages, scorer, codec, 0)
    for dl in sorted(outcome.dead_letters, key=lambda d: d.message.offset())[:1]:
        i = dl.message.offset()
        raise ManifestError(f"{where}: test vector {i} ({_inputs(m.test_vectors[i])}) is refused at "
                            f"{dl.stage.value}: {dl.error_message}")
    for message, verdict in outcome.verdicts:
        v = m.test_vectors[message.offset()]
        if not abs(verdict.fraud_probability - v.probability) <= v.tolerance:
            raise ManifestError(f"{where}: test vector {message.offset()} ({_inputs(v)}) scores "
                                f"{verdict.fraud_probability:.6g}, the manifest expects {v.probability:.6g} "
                                f"(tolerance {v.tolerance:g})")


def encode_record(schema: dict, inputs: dict, placeholder: str, time_path: str = "") -> bytes:
    """An Avro record of `schema` (schemaless) with `inputs` at their dotted paths and every other field filled.

    Other fields take their schema default, else null where allowed, else a neutral value: `placeholder` for
    strings (so id fields are valid), NEUTRAL_TIME_MS for timestamps and the field at `time_path`, else zero.
    """
    if time_path and time_path not in inputs:
        inputs = {**inputs, time_path: _NEUTRAL}
    parsed, record = fastavro.parse_schema(schema), _record(schema, inputs, placeholder, "")
    validate(record, parsed, raise_errors=True)  # the writer alone would write a null boolean as false
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, record)
    return buf.getvalue()


def write_test_vectors(manifest_path: Path, rows: list[tuple[dict, float]], tolerance: float) -> None:
    """Write (inputs, probability) rows into a manifest file's `test_vectors`, keeping its other keys and order."""
    data = json.loads(Path(manifest_path).read_text())
    data["test_vectors"] = [{"inputs": inputs, "probability": round(float(p), 8), "tolerance": tolerance}
                            for inputs, p in rows]
    Path(manifest_path).write_text(json.dumps(data, indent=2) + "\n")


def _record(schema: dict, inputs: dict, placeholder: str, prefix: str) -> dict:
    out = {}
    for f in schema["fields"]:
        path = prefix + f["name"]
        node = f["type"]
        branches = [b for b in node if b != "null"] if isinstance(node, list) else [node]
        inner = branches[0] if branches else "null"
        if path in inputs:
            out[f["name"]] = _typed(inner, inputs[path])
        elif isinstance(inner, dict) and inner.get("type") == "record" and any(p.startswith(path + ".") for p in inputs):
            out[f["name"]] = _record(inner, inputs, placeholder, path + ".")
        elif "default" in f:
            out[f["name"]] = f["default"]
        elif isinstance(node, list) and "null" in node:
            out[f["name"]] = None
        else:
            out[f["name"]] = _neutral(inner, placeholder)
    return out


def _typed(node, value):
    """A JSON value as the Avro type wants it: decimals as Decimal, booleans from 0/1, integers from whole floats."""
    if value is None:
        return None
    kind = node if isinstance(node, str) else node.get("logicalType") or node.get("type")
    if value is _NEUTRAL:
        value = NEUTRAL_TIME_MS
    if kind.endswith("timestamp-micros"):
        return int(value) * 1000  # test vectors give every timestamp in epoch milliseconds
    if kind == "decimal":
        return Decimal(str(value))
    if kind == "boolean":
        return bool(value)
    if kind in ("int", "long", "timestamp-millis", "local-timestamp-millis"):
        return int(value)
    if kind in ("float", "double"):
        return float(value)
    return value


def _neutral(node, placeholder: str):
    if isinstance(node, dict):
        kind = node["type"]
        if kind == "record":
            return _record(node, {}, placeholder, "")
        if kind == "enum":
            return node["symbols"][0]
        if kind == "fixed":
            return b"\0" * node["size"]
        if kind == "array":
            return []
        if kind == "map":
            return {}
        if node.get("logicalType") == "decimal":
            return Decimal(0)
        if node.get("logicalType", "").endswith(("timestamp-millis", "timestamp-micros")):
            return _typed(node, _NEUTRAL)
        return _neutral(kind, placeholder)
    return {"string": placeholder, "bytes": b"", "boolean": False, "null": None}.get(node, 0)


def _inputs(v: TestVector) -> str:
    return ", ".join(f"{k}={val!r}" for k, val in v.inputs.items())
