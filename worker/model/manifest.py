"""The model manifest: which fields feed the model, how they are transformed, and the thresholds."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..records import Transaction

TRANSACTION_FIELDS = {name: tp for name, tp in Transaction.__annotations__.items()}
_NUMERIC = {"float", "bool", "int"}
_TIMESTAMP_TRANSFORMS = {"hour_of_day", "day_of_week"}
_MS_PER_HOUR, _MS_PER_DAY = 3_600_000, 86_400_000
# 1970-01-01 was a Thursday: with Monday = 0, day 0 of the epoch is 3.
_EPOCH_WEEKDAY = 3


class ManifestError(ValueError):
    """The manifest or the model it names cannot be used."""


class Feature(BaseModel):
    """One model input column: a field (a dotted path into nested records), transformed, clipped, standardised.

    In order: `transform` is `number` (booleans 0/1, decimals as floats, timestamps as epoch ms), `log1p`,
    `hour_of_day` / `day_of_week` (UTC, Monday = 0) of a timestamp, or `lookup` of the value's text in `table`
    (else `default`); a null or absent value instead becomes `missing` (when given; else the record is a `validate`
    dead letter); then `clip` to [lo, hi]; then (x - mean) / scale. examples/bank/train.py computes the same.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str = Field(min_length=1)
    transform: Literal["number", "log1p", "hour_of_day", "day_of_week", "lookup"] = "number"
    table: dict[str, float] | None = None
    default: float | None = None
    clip: tuple[float, float] | None = None
    missing: float | None = None
    mean: float
    scale: float

    @model_validator(mode="before")
    @classmethod
    def _standardisation_stated(cls, data):
        # A missing scaler is the classic silent mistake (the reference model: accuracy 0.973 -> 0.489), so there is
        # no default: a model that takes the raw value says so with mean 0 and scale 1.
        if isinstance(data, dict) and not {"mean", "scale"} <= data.keys():
            raise ValueError(f"{data.get('source')}: state the standardisation with `mean` and `scale` "
                             "(0 and 1 when the model takes the raw value)")
        return data

    @field_validator("scale")
    @classmethod
    def _nonzero(cls, v: float) -> float:
        if v == 0 or not np.isfinite(v):
            raise ValueError("scale must be finite and non-zero")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Feature:
        if (self.transform == "lookup") != (self.table is not None and self.default is not None):
            raise ValueError(f"{self.source}: a lookup needs `table` and `default`, and only a lookup has them")
        if self.clip is not None and not self.clip[0] <= self.clip[1]:
            raise ValueError(f"{self.source}: clip must be [lo, hi] with lo <= hi")
        return self

    def from_numbers(self, x: np.ndarray) -> np.ndarray:
        """The transform of a float64 column (timestamps in epoch milliseconds); not yet clipped or standardised."""
        if self.transform == "log1p":
            with np.errstate(invalid="ignore", divide="ignore"):
                x = np.log1p(x)
        elif self.transform == "hour_of_day":
            x = np.floor_divide(x, _MS_PER_HOUR) % 24
        elif self.transform == "day_of_week":
            x = (np.floor_divide(x, _MS_PER_DAY) + _EPOCH_WEEKDAY) % 7
        return x

    def from_texts(self, texts: Sequence[str]) -> np.ndarray:
        """The lookup of each text in `table` (else `default`); not yet clipped or standardised."""
        table, default = self.table or {}, self.default
        return np.fromiter((table.get(t, default) for t in texts), dtype=np.float64, count=len(texts))

    def clipped(self, x: np.ndarray) -> np.ndarray:
        """`x` clipped to `clip`, if the feature has one."""
        return np.clip(x, *self.clip) if self.clip is not None else x


class TestVector(BaseModel):
    """An input row (values by field path; other fields get their schema default) and the probability it must score."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    inputs: dict[str, float | int | bool | str | None]
    probability: float = Field(ge=0.0, le=1.0)
    tolerance: float = Field(default=1e-5, gt=0.0)


class Thresholds(BaseModel):
    """Probabilities above which a transaction is sent to REVIEW or DECLINEd (is_fraud)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    review: float = Field(ge=0.0, le=1.0)
    decline: float = Field(ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        if self.review > self.decline:
            raise ValueError("thresholds.review must not exceed thresholds.decline")
        return self


class Manifest(BaseModel):
    """A model's manifest; see models/*.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    model_file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input: str
    output: str
    output_column: int | None = Field(default=None, ge=0, description="Column of an [N, k] output; needed for k > 1.")
    features: list[Feature] = Field(min_length=1)
    id_field: str = Field("transaction_id", min_length=1, description="The record's id, copied into the verdict.")
    card_field: str = Field("card_id", min_length=1, description="The card's id, copied into the verdict.")
    event_time_field: str = Field("event_time", min_length=1, description="The event time, copied into the verdict.")
    copy_fields: list[str] = Field(default_factory=list, description="Input fields copied into verdict attributes.")
    thresholds: Thresholds
    test_vectors: list[TestVector] = Field(default_factory=list, description="Rows checked at every load.")
    path: Path | None = Field(default=None, exclude=True)

    @classmethod
    def load(cls, path: str | Path, schema: dict | None = None) -> Manifest:
        """Read and validate a manifest file against the input schema (None: ours); raise ManifestError in one line."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(f"model manifest not found: {path}") from None
        except (OSError, ValueError) as exc:  # ValueError covers JSONDecodeError and UnicodeDecodeError
            raise ManifestError(f"model manifest {path} is not readable JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ManifestError(f"model manifest {path} is invalid: it holds a JSON {type(data).__name__}, not an object")
        try:
            manifest = cls(**data, path=path.resolve())
        except (TypeError, ValidationError) as exc:
            raise ManifestError(f"model manifest {path} is invalid: {_one_line(exc)}") from None
        problem = manifest.problem_with(schema)
        if problem:
            raise ManifestError(f"model manifest {path} is invalid: {problem}")
        return manifest

    def problem_with(self, schema: dict | None) -> str | None:
        """Why the manifest's fields do not fit the input schema (None: schemas/transaction.avsc), or None."""
        if schema is None:
            return self._problem_with_transactions()
        fields = [("id_field", self.id_field, {"string"}), ("card_field", self.card_field, {"string"}),
                  ("event_time_field", self.event_time_field, {"timestamp", "long"})]
        for key, path, kinds in fields:
            kind = field_kind(schema, path)
            if kind is None or kind.lstrip("?") not in kinds:
                return f"{key} {path!r} must name a {' or '.join(sorted(kinds))} field of {schema.get('name')}, not {kind}"
        for path in self.copy_fields + self._vector_paths():
            if field_kind(schema, path) is None:
                what = "copy_fields" if path in self.copy_fields else "test_vectors"
                return f"{what}: {path!r} is not a field of {schema.get('name')}"
        for f in self.features:
            kind = field_kind(schema, f.source)
            if kind is None:
                return (f"unknown feature source field {f.source!r} in {schema.get('name')}; its fields are "
                        f"{', '.join(leaf_paths(schema))}")
            wanted = _KINDS_FOR[f.transform]
            if kind.lstrip("?") not in wanted:
                return f"feature {f.source!r}: {f.transform} needs a {'/'.join(sorted(wanted))} field, not {kind.lstrip('?')}"
        return None

    def _problem_with_transactions(self) -> str | None:
        for path in self._vector_paths():
            if path not in TRANSACTION_FIELDS:
                return f"test_vectors: {path!r} is not a Transaction field; its fields are {sorted(TRANSACTION_FIELDS)}"
        for f in self.features:
            kind = TRANSACTION_FIELDS.get(f.source)
            if kind not in _NUMERIC:
                numeric = sorted(k for k, t in TRANSACTION_FIELDS.items() if t in _NUMERIC)
                return f"unknown feature source field {f.source!r}; numeric Transaction fields are {numeric}"
            if f.transform == "lookup" or (f.transform in _TIMESTAMP_TRANSFORMS and f.source != "event_time"):
                return f"feature {f.source!r}: {f.transform} does not apply to a {kind} field"
        return None

    def _vector_paths(self) -> list[str]:
        return sorted({path for v in self.test_vectors for path in v.inputs})

    def model_path(self, override: str | Path | None = None) -> Path:
        """The .onnx file, relative to the manifest unless overridden."""
        if override:
            return Path(override)
        base = self.path.parent if self.path else Path.cwd()
        return (base / self.model_file).resolve()

    def read_model_bytes(self, override: str | Path | None = None) -> bytes:
        """Read the model file and check its sha256 against the manifest."""
        model_path = self.model_path(override)
        try:
            blob = model_path.read_bytes()
        except OSError as exc:
            raise ManifestError(f"model file not readable: {model_path}: {exc.strerror}") from None
        digest = hashlib.sha256(blob).hexdigest()
        if digest != self.sha256:
            raise ManifestError(f"model file {model_path} has sha256 {digest}, manifest pins {self.sha256}")
        return blob

    def feature_matrix(self, txns: Sequence[Transaction]) -> np.ndarray:
        """The float32 input matrix for typed transactions."""
        return self.matrix(
            lambda name: np.fromiter((getattr(t, name) for t in txns), dtype=np.float64, count=len(txns)), len(txns)
        )

    def matrix(self, column: Callable[[str], np.ndarray], n: int) -> np.ndarray:
        """Build the float32 input matrix from numeric columns (booleans as 0/1): transformed, standardised, cast."""
        return self.standardised([f.clipped(f.from_numbers(column(f.source))) for f in self.features], n)

    def standardised(self, columns: Sequence[np.ndarray], n: int) -> np.ndarray:
        """The transformed columns as the float32 input matrix, standardised in float64 with each mean and scale."""
        x = np.empty((n, len(self.features)), dtype=np.float64)
        for j, values in enumerate(columns):
            x[:, j] = values
        return self.standardise(x)

    def standardise(self, x: np.ndarray) -> np.ndarray:
        """A float64 [n, features] matrix of transformed values (changed in place) as the float32 input matrix."""
        c = self.constants
        if not c.identity:  # x - 0.0 and x / 1.0 are x exactly
            x -= c.means
            x /= c.scales
        return x.astype(np.float32)

    @cached_property
    def constants(self) -> Constants:
        """The arrays and facts the per-batch code needs, computed once."""
        return Constants(self.features)


class Constants:
    """A manifest's per-batch constants; compared by identity, so that Manifest equality still compares its fields."""

    __slots__ = ("means", "scales", "identity", "raw_sources")

    def __init__(self, features: Sequence[Feature]):
        self.means = np.array([f.mean for f in features], dtype=np.float64)
        self.scales = np.array([f.scale for f in features], dtype=np.float64)
        # Means of +0.0 (not -0.0: -0.0 - -0.0 is +0.0) and scales of 1.0 leave every value as it is.
        self.identity = self.means.tobytes() == bytes(self.means.nbytes) and bool((self.scales == 1.0).all())
        # The sources, when every feature is its field's number as is (no transform, no clip), else None.
        plain = all(f.transform == "number" and f.clip is None for f in features)
        self.raw_sources = tuple(f.source for f in features) if plain else None


_KINDS_FOR = {
    "number": {"int", "long", "float", "double", "boolean", "decimal", "timestamp"},
    "log1p": {"int", "long", "float", "double", "decimal"},
    "hour_of_day": {"timestamp", "long"},
    "day_of_week": {"timestamp", "long"},
    "lookup": {"string", "enum", "int", "long", "boolean"},
}


def leaf_paths(schema: dict, prefix: str = "") -> list[str]:
    """The dotted paths of a record schema's non-record fields, nested records included."""
    out = []
    for f in schema.get("fields", []):
        node = f["type"]
        branches = [b for b in node if b != "null"] if isinstance(node, list) else [node]
        inner = branches[0] if len(branches) == 1 else None
        if isinstance(inner, dict) and inner.get("type") == "record":
            out += leaf_paths(inner, f"{prefix}{f['name']}.")
        else:
            out.append(prefix + f["name"])
    return out


def field_kind(schema: dict, path: str) -> str | None:
    """The kind of the field at a dotted path of an Avro record schema (int, long, float, double, boolean, string,
    enum, decimal, timestamp, bytes, fixed, record, array, map), prefixed by "?" when null is allowed on the way;
    None when there is no such field."""
    node, nullable = schema, False
    for name in path.split("."):
        if not isinstance(node, dict) or node.get("type") != "record":
            return None
        field = next((f for f in node["fields"] if f["name"] == name), None)
        if field is None:
            return None
        node = field["type"]
        if isinstance(node, list):
            branches = [b for b in node if b != "null"]
            nullable = nullable or len(branches) < len(node)
            if len(branches) != 1:
                return None  # a union of several types has no single kind
            node = branches[0]
    kind = _kind(node)
    return f"?{kind}" if nullable else kind


def _kind(node) -> str:
    if isinstance(node, str):
        return node
    logical = node.get("logicalType")
    if logical == "decimal":
        return "decimal"
    if logical in ("timestamp-millis", "timestamp-micros", "local-timestamp-millis", "local-timestamp-micros"):
        return "timestamp"
    return node["type"] if isinstance(node["type"], str) else _kind(node["type"])


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg'].removeprefix('Value error, ')}"
                         for e in exc.errors())
    return str(exc).replace("\n", " ")
