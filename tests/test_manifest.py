"""Tests for model manifests and OnnxScorer: the reference model's numbers, and one-line errors for bad models."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.fakes import make_txn
from tests.models import linear_model, zipmap_model
from worker.model.manifest import ManifestError
from worker.model.scorer import OnnxScorer

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference-model"
REFERENCE_MANIFEST = ROOT / "models" / "reference-fraud-mlp.json"
EXPECTED = json.loads((REFERENCE / "expected.json").read_text())
FLAGS = ("repeat_retailer", "used_chip", "used_pin_number", "online_order")
FLOATS = ("distance_from_home", "distance_from_last_transaction", "ratio_to_median_purchase_price")


@pytest.fixture(scope="module")
def reference_scorer() -> OnnxScorer:
    """The reference model, loaded through its manifest."""
    return OnnxScorer.load(REFERENCE_MANIFEST)


@pytest.fixture(scope="module")
def sample():
    """The reference sample as (transactions, labels)."""
    with (REFERENCE / "card_transdata_sample.csv").open() as f:
        rows = list(csv.DictReader(f))
    txns = [
        make_txn(transaction_id=f"row-{i}", **{k: float(r[k]) for k in FLOATS}, **{k: r[k] == "1" for k in FLAGS})
        for i, r in enumerate(rows)
    ]
    return txns, np.array([int(float(r["fraud"])) for r in rows])


def test_reference_manifest_matches_expected_preprocessing():
    """The reference manifest pins the model's sha256, names, feature order, means and scales from expected.json."""
    m = json.loads(REFERENCE_MANIFEST.read_text())
    pre = EXPECTED["preprocessing"]
    assert m["sha256"] == EXPECTED["sha256"]
    assert (m["input"], m["output"]) == (EXPECTED["input"]["name"], EXPECTED["output"]["name"])
    assert [f["source"] for f in m["features"]] == EXPECTED["feature_order"]
    assert [f["mean"] for f in m["features"]] == pre["mean"]
    assert [f["scale"] for f in m["features"]] == pre["scale"]


def test_reference_examples_match(reference_scorer, sample):
    """Every example row of expected.json scores within 1e-5 of its expected probability."""
    txns, _ = sample
    rows = [e["row"] for e in EXPECTED["examples"]]
    probs = reference_scorer.predict(reference_scorer.manifest.feature_matrix([txns[r] for r in rows]))
    expected = [e["probability"] for e in EXPECTED["examples"]]
    assert np.abs(probs - expected).max() < 1e-5


def test_reference_confusion_counts_at_095(reference_scorer, sample):
    """On the whole sample, tp/fp/fn/tn at threshold 0.95 (probability strictly greater) match expected.json exactly."""
    txns, labels = sample
    fraud = reference_scorer.predict(reference_scorer.manifest.feature_matrix(txns)) > 0.95
    want = next(m for m in EXPECTED["metrics_on_sample"] if m["threshold"] == 0.95)
    got = {
        "tp": int((fraud & (labels == 1)).sum()),
        "fp": int((fraud & (labels == 0)).sum()),
        "fn": int((~fraud & (labels == 1)).sum()),
        "tn": int((~fraud & (labels == 0)).sum()),
    }
    assert got == {k: want[k] for k in ("tp", "fp", "fn", "tn")}


def test_scaler_is_applied(reference_scorer, sample):
    """Row 0 scores as legitimate through the manifest, but as fraud if the scaler is skipped, as expected.json warns."""
    row0 = sample[0][0]
    manifest = reference_scorer.manifest
    unscaled = np.array([[float(getattr(row0, f.source)) for f in manifest.features]], dtype=np.float32)
    warning = EXPECTED["unscaled_input_warning"]
    assert warning["row"] == 0
    assert abs(reference_scorer.predict(unscaled)[0] - warning["probability_if_preprocessing_is_skipped"]) < 1e-5
    assert reference_scorer.predict(unscaled)[0] > 0.95
    assert reference_scorer.predict(manifest.feature_matrix([row0]))[0] < 0.01


def write_manifest(tmp_path: Path, **changes) -> Path:
    """Write the reference manifest, pointing at the reference model by absolute path, with `changes` applied."""
    data = json.loads(REFERENCE_MANIFEST.read_text())
    data["model_file"] = str(REFERENCE / "fraud-mlp.onnx")
    data.update(changes)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    return path


def write_model(tmp_path: Path, blob: bytes, **changes) -> Path:
    """Write `blob` as the model beside a manifest that pins its sha256; return the manifest."""
    (tmp_path / "model.onnx").write_bytes(blob)
    return write_manifest(tmp_path, model_file="model.onnx", sha256=hashlib.sha256(blob).hexdigest(), **changes)


def load_error(manifest_path: Path) -> str:
    """Load the manifest's model and return the ManifestError message, checking that it is one line."""
    with pytest.raises(ManifestError) as info:
        OnnxScorer.load(manifest_path)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_written_manifest_loads(tmp_path):
    """The helper's unchanged manifest loads, so each error below is caused by its one change."""
    assert OnnxScorer.load(write_manifest(tmp_path)).manifest.name == "fraud-mlp"


def test_missing_manifest(tmp_path):
    """A manifest path that does not exist is a one-line error naming it."""
    assert "not found" in load_error(tmp_path / "nope.json")


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b"\xff\xfe{}"], ids=["syntax", "empty", "list", "not-utf8"])
def test_invalid_json(tmp_path, content):
    """A manifest that is not a JSON object is a one-line error naming the manifest."""
    path = tmp_path / "manifest.json"
    path.write_bytes(content)
    assert "manifest.json" in load_error(path)


def test_unknown_feature_source(tmp_path):
    """A feature whose source is not a numeric Transaction field is a one-line error naming it."""
    features = json.loads(REFERENCE_MANIFEST.read_text())["features"]
    features[1] = {"source": "merchant_country", "mean": 0.0, "scale": 1.0}
    assert "unknown feature source field 'merchant_country'" in load_error(write_manifest(tmp_path, features=features))


def test_missing_model_file(tmp_path):
    """A manifest whose model file does not exist is a one-line error naming the file."""
    assert "missing.onnx" in load_error(write_manifest(tmp_path, model_file="missing.onnx"))


def test_sha256_mismatch(tmp_path):
    """A model file with one byte altered fails the sha256 check, naming both digests."""
    blob = bytearray((REFERENCE / "fraud-mlp.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (tmp_path / "model.onnx").write_bytes(blob)
    message = load_error(write_manifest(tmp_path, model_file="model.onnx"))
    assert hashlib.sha256(blob).hexdigest() in message and EXPECTED["sha256"] in message


def test_input_name_not_in_model(tmp_path):
    """A manifest input the model does not have is a one-line error naming it and the model's inputs."""
    message = load_error(write_manifest(tmp_path, input="features"))
    assert "'features' is not a model input" in message and "dense_input" in message


def test_output_name_not_in_model(tmp_path):
    """A manifest output the model does not have is a one-line error naming it and the model's outputs."""
    message = load_error(write_manifest(tmp_path, output="probabilities"))
    assert "'probabilities' is not a model output" in message and "dense_3" in message


def test_feature_count_differs_from_model_width(tmp_path):
    """A manifest listing 4 features for a 5-wide model input is a one-line error giving both counts."""
    features = json.loads(REFERENCE_MANIFEST.read_text())["features"][:4]
    assert "takes 5 features, the manifest lists 4" in load_error(write_manifest(tmp_path, features=features))


def test_file_that_is_not_onnx(tmp_path):
    """A file that is not ONNX, with a matching sha256, is a one-line error from onnxruntime naming the file."""
    message = load_error(write_model(tmp_path, b"this is not an onnx model\n" * 10))
    assert "cannot be loaded by onnxruntime" in message and "model.onnx" in message


def test_model_with_external_data_is_refused(tmp_path, monkeypatch):
    """A model whose weights live in an external data file is refused, even when that file is found from the cwd."""
    weights = numpy_helper.from_array(np.ones((5, 1), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["dense_input", "w"], ["dense_3"])], "external",
        [helper.make_tensor_value_info("dense_input", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("dense_3", TensorProto.FLOAT, ["N", 1])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True,
                    location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").stat().st_size == 20
    blob = (tmp_path / "model.onnx").read_bytes()
    monkeypatch.chdir(tmp_path)
    assert "cannot be loaded by onnxruntime" in load_error(write_model(tmp_path, blob))


GBT_MANIFEST = ROOT / "models" / "fraud-gbt.json"


def gbt_like(tmp_path: Path, blob: bytes | None = None, **changes) -> Path:
    """The default model's manifest (7 raw features), for `blob` as its model when given, with `changes` applied."""
    data = json.loads(GBT_MANIFEST.read_text())
    data["model_file"] = str(ROOT / "models" / data["model_file"])
    if blob is not None:
        (tmp_path / "model.onnx").write_bytes(blob)
        data.update(model_file="model.onnx", sha256=hashlib.sha256(blob).hexdigest(), input="features",
                    output="out", test_vectors=[])
    data.update(changes)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("last, columns, needle", [
    (None, 1, "is not a probability: trial rows give values in"),
    ("Sigmoid", 2, "sum to"),
], ids=["logit", "two-sigmoids"])
def test_output_that_is_not_a_probability_is_refused(tmp_path, last, columns, needle):
    """A logit output, and [N, 2] rows that do not sum to 1, are refused at load, however the column is set."""
    assert needle in load_error(gbt_like(tmp_path, linear_model(columns, last), output_column=columns - 1))


def test_softmax_output_with_an_explicit_column_loads(tmp_path):
    """The same graph ended by a softmax is a proper [N, 2] probability output and loads with output_column 1."""
    scorer = OnnxScorer.load(gbt_like(tmp_path, linear_model(2, "Softmax"), output_column=1))
    assert scorer.predict(np.ones((3, 7), dtype=np.float32)).shape == (3,)


def test_skl2onnx_default_export_is_refused_with_the_hint_that_works(tmp_path):
    """Both outputs of a default skl2onnx export are refused with the re-export hint, and the hinted export loads."""
    default = zipmap_model(zipmap=True)
    for output in ("output_probability", "output_label"):
        message = load_error(gbt_like(tmp_path, default, input="X", output=output, output_column=1))
        assert "options={'zipmap': False}" in message and "'probabilities'" in message
    scorer = OnnxScorer.load(gbt_like(tmp_path, zipmap_model(zipmap=False), input="X", output="probabilities",
                                      output_column=1))
    assert 0.0 <= scorer.predict(np.zeros((1, 7), dtype=np.float32))[0] <= 1.0


def test_test_vector_mismatch_names_the_row_and_both_values(tmp_path):
    """A test vector the model does not reproduce is refused, naming the row, its inputs, and both probabilities."""
    from worker.model.lifecycle import load_model
    from worker.settings import Settings

    vectors = json.loads(GBT_MANIFEST.read_text())["test_vectors"]
    vectors[1] = {**vectors[1], "probability": 0.5}
    with pytest.raises(ManifestError) as info:
        load_model(Settings(model_manifest=gbt_like(tmp_path, test_vectors=vectors)))
    assert "test vector 1 (distance_from_home=20.18" in str(info.value)
    assert "scores 0.868333, the manifest expects 0.5 (tolerance 1e-05)" in str(info.value)


@pytest.mark.parametrize("vector, needle", [
    ({"inputs": {"shoe_size": 42}, "probability": 0.5}, "test_vectors: 'shoe_size' is not a Transaction field"),
    ({"inputs": {"used_chip": None}, "probability": 0.5}, "test vector 0 is not a Transaction record"),
    ({"inputs": {"distance_from_home": float("nan")}, "probability": 0.5}, "test vector 0 (distance_from_home=nan)"),
    ({"inputs": {}, "probability": 1.5}, "probability"),
], ids=["unknown-field", "null-in-a-required-field", "nan-feature", "probability-out-of-range"])
def test_unusable_test_vector_is_one_line(tmp_path, vector, needle):
    """A test vector naming no field, holding a value its field cannot take, or a non-probability is one line."""
    from worker.model.lifecycle import load_model
    from worker.settings import Settings

    with pytest.raises(ManifestError) as info:
        load_model(Settings(model_manifest=gbt_like(tmp_path, test_vectors=[vector])))
    assert needle in str(info.value) and "\n" not in str(info.value)
