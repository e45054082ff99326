"""Train the bank example's fraud model on synthetic CardPayment records; write bank-fraud.onnx and its manifest.

The features are computed from the records by `features()`, written from the manifest's feature
semantics: it is the reference the worker's manifest-driven feature code is compared with.
Rerunning with the same arguments writes the same bytes (fixed seeds, sorted opset imports).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the worker's package, also when run as a plain script
from worker.model.vectors import write_test_vectors  # noqa: E402


def _load(name: str, path: Path):
    """Import a sibling file as a module (examples/bank is not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


synth = _load("bank_synth", HERE / "synth.py")

NAME = "bank-fraud"
VERSION = "1.0.0"
INPUT, OUTPUT = "features", "probabilities"
RISKY_MCCS = ["5967", "7995", "4829"]
# Share of held-out traffic the thresholds put above review (REVIEW or DECLINE) and above decline.
REVIEW_SHARE, DECLINE_SHARE = 0.05, 0.01
# Test vectors hold scikit-learn's float64 probabilities; the ONNX trees run in float32 (drift < 1e-4, checked below).
TOLERANCE = 1e-4


class MissingFeature(ValueError):
    """A feature's source is null or absent and its spec has no `missing` value: the record is dead-lettered."""


# ---------------------------------------------------------------------------------------------
# The reference implementation of the manifest's feature semantics.
# ---------------------------------------------------------------------------------------------

def value_at(record: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path through nested records, or None when a step is null or absent."""
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _number(value: Any) -> float:
    """int/long/float/double as float, boolean as 0/1, decimal as its float value."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float, Decimal)):
        return float(value)
    raise TypeError(f"not a number: {value!r}")


def _utc(value: Any) -> datetime:
    """A timestamp (fastavro decodes timestamp-millis/micros to aware datetimes) in UTC."""
    if not isinstance(value, datetime):
        raise TypeError(f"not a timestamp: {value!r}")
    return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)


TRANSFORMS = {
    "number": lambda v, spec: _number(v),
    "log1p": lambda v, spec: math.log1p(_number(v)),
    "hour_of_day": lambda v, spec: float(_utc(v).hour),
    "day_of_week": lambda v, spec: float(_utc(v).weekday()),
    "lookup": lambda v, spec: float(spec["table"].get(str(v), spec["default"])),
}


def feature_value(record: Mapping[str, Any], spec: Mapping[str, Any]) -> float:
    """One feature of one record, in float64: source, missing or transform, clip, then (x - mean) / scale."""
    raw = value_at(record, spec["source"])
    if raw is None:
        missing = spec.get("missing")
        if isinstance(missing, bool) or not isinstance(missing, (int, float)):
            raise MissingFeature(f"{spec['source']} is null and the feature has no missing value")
        x = float(missing)  # used as the raw value: no transform, but clip and standardisation apply
    else:
        x = TRANSFORMS[spec.get("transform", "number")](raw, spec)
    if "clip" in spec:
        lo, hi = spec["clip"]
        x = min(max(x, float(lo)), float(hi))
    return (x - float(spec.get("mean", 0.0))) / float(spec.get("scale", 1.0))


def features(records: Iterable[Mapping[str, Any]], specs: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """The model's float32 input matrix [N, F] for records, by the manifest's feature specs."""
    rows = [[feature_value(r, spec) for spec in specs] for r in records]
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(specs)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Training and export.
# ---------------------------------------------------------------------------------------------

def feature_specs(train_records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The manifest's features, with mean and scale of the non-binary ones taken from the training records."""
    specs: list[dict[str, Any]] = [
        {"source": "amount", "transform": "log1p"},
        {"source": "channel", "transform": "lookup", "table": {"ECOM": 1.0, "MOTO": 1.0}, "default": 0.0},
        {"source": "card_present", "transform": "number", "missing": 0.5},
        {"source": "merchant.mcc", "transform": "lookup", "table": dict.fromkeys(RISKY_MCCS, 1.0), "default": 0.0},
        {"source": "event_time", "transform": "hour_of_day"},
        {"source": "event_time", "transform": "day_of_week"},
        # log1p(km) clipped to [0, 10] is already on a small scale; without mean/scale its missing value
        # (0.0, "as if at home") means the same whether or not standardisation applies to missing values.
        {"source": "customer_distance_km", "transform": "log1p", "missing": 0.0, "clip": [0, 10]},
    ]
    for spec in specs:
        spec["mean"], spec["scale"] = 0.0, 1.0
        if spec["source"] in ("amount", "event_time"):
            x = features(train_records, [spec])[:, 0].astype(np.float64)
            spec["mean"] = round(float(x.mean()), 6)
            spec["scale"] = round(float(x.std()), 6)
    return specs


def test_vectors(records: Sequence[Mapping[str, Any]], specs: Sequence[Mapping[str, Any]], p: np.ndarray,
                 thresholds: tuple[float, float]) -> list[tuple[dict, float]]:
    """The first held-out record scikit-learn approves, reviews and declines: its feature fields and probability."""
    bands = np.searchsorted(np.array(thresholds), p, side="left")  # 0 approve, 1 review, 2 decline (p > threshold)
    rows = [int(np.flatnonzero(bands == band)[0]) for band in (0, 1, 2) if np.any(bands == band)]
    return [({spec["source"]: _json(value_at(records[i], spec["source"])) for spec in specs}, float(p[i]))
            for i in rows]


def _json(value: Any) -> Any:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    return float(value) if isinstance(value, Decimal) else value


def export_onnx(model, n_features: int) -> bytes:
    """The model as ONNX bytes: input `features` float32 [None, F], outputs `label` and `probabilities`."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    onx = to_onnx(
        model,
        initial_types=[(INPUT, FloatTensorType([None, n_features]))],
        options={id(model): {"zipmap": False}},
        target_opset={"": 15, "ai.onnx.ml": 3},
    )
    assert [o.name for o in onx.graph.output] == ["label", OUTPUT]
    # skl2onnx emits opset_import in set order, which varies with PYTHONHASHSEED.
    opsets = sorted(onx.opset_import, key=lambda o: o.domain)
    del onx.opset_import[:]
    onx.opset_import.extend(opsets)
    return onx.SerializeToString()


def onnx_probabilities(data: bytes, x: np.ndarray) -> np.ndarray:
    """P(fraud) for x from the exported model, as the worker computes it (output column 1)."""
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT], {INPUT: x})[0][:, 1]


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, generate, train, evaluate, export and write the manifest."""
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args(argv)

    rows = synth.generate(args.rows, seed=args.seed)
    records = [r for r, _ in rows]
    y = np.array([label for _, label in rows], dtype=np.int64)
    cut = int(0.8 * len(rows))  # records are in event-time order: train on the first 80%, hold out the rest
    specs = feature_specs(records[:cut])
    x = features(records, specs)
    x_train, x_test, y_train, y_test = x[:cut], x[cut:], y[:cut], y[cut:]

    clf = GradientBoostingClassifier(n_estimators=80, max_depth=3, learning_rate=0.1, random_state=args.seed)
    clf.fit(x_train, y_train)
    data = export_onnx(clf, x.shape[1])
    p = onnx_probabilities(data, x_test)
    drift = float(np.max(np.abs(p - clf.predict_proba(x_test)[:, 1])))
    assert drift < 1e-4, f"ONNX and scikit-learn disagree by {drift}"

    # The worker flags p > threshold, so the (1 - share) quantile puts about `share` of traffic above it.
    review = round(float(np.quantile(p, 1 - REVIEW_SHARE)), 4)
    decline = round(float(np.quantile(p, 1 - DECLINE_SHARE)), 4)
    print(f"rows {args.rows} (train {cut}, held-out {len(y) - cut}), seed {args.seed}, {x.shape[1]} features")
    print(f"fraud rate: all {y.mean():.4f}, held-out {y_test.mean():.4f}")
    print(f"held-out AUC {roc_auc_score(y_test, p):.4f} (ONNX; max |ONNX - sklearn| {drift:.1e})")
    for label, t in (("review", review), ("decline", decline)):
        flagged = p > t
        tp = int(np.sum(flagged & (y_test == 1)))
        print(f"{label:8s} p > {t:.4f}: {flagged.mean():.4f} of held-out traffic, "
              f"precision {tp / max(int(flagged.sum()), 1):.3f}, recall {tp / max(int(y_test.sum()), 1):.3f}")

    sha = hashlib.sha256(data).hexdigest()
    manifest = {
        "name": NAME,
        "version": VERSION,
        "model_file": f"{NAME}.onnx",
        "sha256": sha,
        "input": INPUT,
        "output": OUTPUT,
        "output_column": 1,
        "id_field": "payment_id",
        "card_field": "card.card_id",
        "event_time_field": "event_time",
        "copy_fields": ["merchant.merchant_id", "amount", "channel"],
        "features": specs,
        "thresholds": {"review": review, "decline": decline},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.onnx").write_bytes(data)
    (args.out / f"{NAME}.json").write_text(json.dumps(manifest, indent=2) + "\n")
    vectors = test_vectors(records[cut:], specs, clf.predict_proba(x_test)[:, 1], (review, decline))
    write_test_vectors(args.out / f"{NAME}.json", vectors, TOLERANCE)
    print(f"wrote {args.out / NAME}.onnx ({len(data)} bytes) sha256 {sha}")
    print(f"wrote {args.out / NAME}.json")


if __name__ == "__main__":
    main()
