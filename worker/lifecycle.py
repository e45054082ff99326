"""Model lifecycle: load a model with every check, swap it while running, and score a challenger in shadow."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .codec import Codec
from .model import OnnxScorer
from .recordcodec import RecordCodec, input_codec, load_input_schema
from .settings import Settings
from .vectors import check_test_vectors


@dataclass(frozen=True)
class LoadedModel:
    """A model that passed every check, with the input codec built for its manifest."""

    scorer: OnnxScorer
    codec: Codec | RecordCodec
    digest: str  # sha256 of the manifest file's bytes: what a watch compares


def load_model(settings: Settings, manifest_path: Path | None = None) -> LoadedModel:
    """Load a manifest (default: FRAUD_MODEL_MANIFEST) and its model: schema fit, sha256, signature, output
    semantics, test vectors through the live path. Raises ManifestError with one line."""
    path = Path(manifest_path or settings.model_manifest)
    digest = manifest_digest(path)
    model_file = settings.model_file if manifest_path is None else None
    scorer = OnnxScorer.load(path, model_file, threads=settings.onnx_threads,
                             schema=load_input_schema(settings.input_schema))
    codec = input_codec(settings.input_schema, scorer.manifest, settings.max_message_bytes)
    check_test_vectors(scorer, codec)
    return LoadedModel(scorer, codec, digest)


def manifest_digest(path: Path) -> str:
    """The sha256 of a manifest file's bytes, or "" when it cannot be read (the load then says why)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""
