"""The model manifest: which fields feed the model, how they are transformed, and the thresholds."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .records import Transaction

TRANSACTION_FIELDS = {name: tp for name, tp in Transaction.__annotations__.items()}
_NUMERIC = {"float", "bool", "int"}


class ManifestError(ValueError):
    """The manifest or the model it names cannot be used."""


class Feature(BaseModel):
    """One model input column: a Transaction field, standardised as (x - mean) / scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str
    mean: float = 0.0
    scale: float = 1.0

    @field_validator("source")
    @classmethod
    def _known_numeric_field(cls, v: str) -> str:
        if TRANSACTION_FIELDS.get(v) not in _NUMERIC:
            numeric = sorted(k for k, t in TRANSACTION_FIELDS.items() if t in _NUMERIC)
            raise ValueError(f"unknown feature source field {v!r}; numeric Transaction fields are {numeric}")
        return v

    @field_validator("scale")
    @classmethod
    def _nonzero(cls, v: float) -> float:
        if v == 0 or not np.isfinite(v):
            raise ValueError("scale must be finite and non-zero")
        return v


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
    output_column: int = Field(default=0, ge=0)
    features: list[Feature] = Field(min_length=1)
    thresholds: Thresholds
    path: Path | None = Field(default=None, exclude=True)

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Read and validate a manifest file; raise ManifestError with one clear line."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(f"model manifest not found: {path}") from None
        except (OSError, ValueError) as exc:  # ValueError covers JSONDecodeError and UnicodeDecodeError
            raise ManifestError(f"model manifest {path} is not readable JSON: {exc}") from None
        try:
            return cls(**data, path=path.resolve())
        except (TypeError, ValidationError) as exc:
            raise ManifestError(f"model manifest {path} is invalid: {_one_line(exc)}") from None

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
        """Build the float32 input matrix from columns: booleans as 0/1, standardised in float64, then cast."""
        x = np.empty((n, len(self.features)), dtype=np.float64)
        for j, feat in enumerate(self.features):
            x[:, j] = column(feat.source)
        x -= self._means
        x /= self._scales
        return x.astype(np.float32)

    @property
    def _means(self) -> np.ndarray:
        return np.array([f.mean for f in self.features], dtype=np.float64)

    @property
    def _scales(self) -> np.ndarray:
        return np.array([f.scale for f in self.features], dtype=np.float64)


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in exc.errors())
    return str(exc).replace("\n", " ")
