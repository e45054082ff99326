"""The bank example (examples/bank): its committed model, manifest, schema and generator agree with each other."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import fastavro
import numpy as np
import pytest

from examples.bank import train  # examples/bank is a namespace package, on the path from the repository root

ROOT = Path(__file__).resolve().parent.parent
BANK = ROOT / "examples" / "bank"
MANIFEST_KEYS = ["name", "version", "model_file", "sha256", "input", "output", "output_column", "id_field",
                 "card_field", "event_time_field", "copy_fields", "features", "thresholds", "test_vectors"]

synth = train.synth


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((BANK / "bank-fraud.json").read_text())


def test_committed_onnx_matches_manifest_sha256(manifest):
    """The committed ONNX has the sha256 its manifest pins, and the manifest has exactly the documented keys."""
    blob = (BANK / manifest["model_file"]).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == manifest["sha256"]
    assert list(manifest) == MANIFEST_KEYS
    assert len(blob) < 300_000


def test_training_reproduces_the_committed_model(tmp_path, manifest):
    """Rerunning train.py (under another hash seed) writes the committed ONNX bytes and manifest again."""
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, str(BANK / "train.py"), "--out", str(tmp_path)], check=True, env=env,
                   capture_output=True, text=True, timeout=120)
    assert hashlib.sha256((tmp_path / "bank-fraud.onnx").read_bytes()).hexdigest() == manifest["sha256"]
    assert json.loads((tmp_path / "bank-fraud.json").read_text()) == manifest


def test_model_separates_fraud_on_fresh_records(manifest):
    """On 2,000 records from an unseen seed, the ONNX model scores AUC > 0.85 with train.py's reference features."""
    from sklearn.metrics import roc_auc_score

    rows = synth.generate(2000, seed=2024)
    y = np.array([label for _, label in rows])
    x = train.features([record for record, _ in rows], manifest["features"])
    assert x.dtype == np.float32 and x.shape == (2000, len(manifest["features"]))
    p = train.onnx_probabilities((BANK / manifest["model_file"]).read_bytes(), x)
    assert roc_auc_score(y, p) > 0.85


def test_synth_records_round_trip_through_the_schema():
    """Generated records encode and decode through card_payment.avsc unchanged."""
    schema = fastavro.parse_schema(json.loads((BANK / "card_payment.avsc").read_text()))
    records = [record for record, _ in synth.generate(500, seed=3)]
    buf = io.BytesIO()
    fastavro.writer(buf, schema, records)
    buf.seek(0)
    assert list(fastavro.reader(buf)) == records
    assert any(r["card_present"] is None for r in records) and any(r["customer_distance_km"] is None for r in records)
