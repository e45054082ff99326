"""Tests for the synthetic transaction generator and the committed default fraud model."""

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from sklearn.metrics import roc_auc_score

from worker.tools.synth import generate

MANIFEST = Path(__file__).resolve().parent.parent / "models" / "fraud-gbt.json"
FLOATS = ["distance_from_home", "distance_from_last_transaction", "ratio_to_median_purchase_price"]
FLAGS = ["repeat_retailer", "used_chip", "used_pin_number", "online_order"]


def test_same_seed_same_data_other_seed_different():
    """The same seed reproduces every column and label; another seed does not."""
    (a, ya), (b, yb), (c, _) = generate(1000, seed=3), generate(1000, seed=3), generate(1000, seed=4)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert np.array_equal(ya, yb)
    assert not np.array_equal(a["amount"], c["amount"])


def test_columns_dtypes_and_ranges():
    """Columns have the documented names, lengths, dtypes and ranges, and labels are 0/1."""
    cols, y = generate(20_000, seed=1)
    assert set(cols) == set(FLOATS + FLAGS + ["amount"])
    assert all(len(v) == 20_000 for v in cols.values()) and len(y) == 20_000
    for name in FLOATS:
        assert cols[name].dtype == np.float64 and (cols[name] >= 0).all()
    for name in FLAGS:
        assert cols[name].dtype == np.bool_
    assert cols["amount"].dtype == np.float64 and (cols["amount"] > 0).all()
    assert set(np.unique(y)) == {0, 1}


def test_fraud_rate_in_band():
    """The fraud rate is close to the real data set's 8.6 % for several seeds."""
    for seed in range(3):
        assert 0.05 < generate(100_000, seed=seed)[1].mean() < 0.12


def test_committed_model_matches_manifest_sha256():
    """The committed ONNX file's sha256 equals the one recorded in its manifest."""
    manifest = json.loads(MANIFEST.read_text())
    data = (MANIFEST.parent / manifest["model_file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == manifest["sha256"]


def test_committed_model_auc_on_fresh_data():
    """The committed model, run by onnxruntime as the manifest says, has AUC > 0.9 on unseen data."""
    manifest = json.loads(MANIFEST.read_text())
    session = ort.InferenceSession(str(MANIFEST.parent / manifest["model_file"]))
    cols, y = generate(50_000, seed=12345)
    x = np.column_stack(
        [cols[f["source"]].astype(np.float64) for f in manifest["features"]]
    ).astype(np.float32)
    proba = session.run([manifest["output"]], {manifest["input"]: x})[0]
    assert proba.shape == (len(y), 2)
    assert roc_auc_score(y, proba[:, manifest["output_column"]]) > 0.9
