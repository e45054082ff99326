"""Train the default fraud model on synthetic data and export it as ONNX plus a worker manifest."""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.metrics import roc_auc_score

# Run as a plain script from anywhere, so the repo root is not on sys.path by default.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from worker.model.vectors import write_test_vectors  # noqa: E402
from worker.tools.synth import generate  # noqa: E402

NAME = "fraud-gbt"
FEATURES = [
    "distance_from_home",
    "distance_from_last_transaction",
    "ratio_to_median_purchase_price",
    "repeat_retailer",
    "used_chip",
    "used_pin_number",
    "online_order",
]
FLAGS = {"repeat_retailer", "used_chip", "used_pin_number", "online_order"}
OUTPUT = "probabilities"
# An automatic decline should almost never hit a good customer; review balances missed fraud
# against wasted reviews, so it takes the best-F1 threshold.
DECLINE_PRECISION = 0.95
GRID = np.round(np.arange(0.05, 1.0, 0.01), 2)
# scikit-learn scores in float64, the ONNX tree ensemble in float32.
TOLERANCE = 1e-5


def to_matrix(columns: dict[str, np.ndarray]) -> np.ndarray:
    """Stack the model's features in manifest order as float32, booleans as 0.0/1.0."""
    return np.column_stack([columns[f].astype(np.float64) for f in FEATURES]).astype(np.float32)


def precision_recall(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float, int]:
    """Return precision, recall and flagged count for `p > threshold`, the worker's rule."""
    flagged = p > threshold
    tp = int(np.sum(flagged & (y == 1)))
    return tp / max(int(flagged.sum()), 1), tp / max(int(y.sum()), 1), int(flagged.sum())


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Return the grid threshold with the highest F1 score."""
    def f1(t: float) -> float:
        prec, rec, _ = precision_recall(y, p, t)
        return 2 * prec * rec / (prec + rec) if prec + rec else 0.0

    return float(max(GRID, key=f1))


def precision_threshold(y: np.ndarray, p: np.ndarray, min_precision: float) -> float:
    """Return the lowest grid threshold whose precision reaches min_precision."""
    return next((float(t) for t in GRID if precision_recall(y, p, t)[0] >= min_precision), 0.99)


def vectors(x: np.ndarray, p: np.ndarray, thresholds: tuple[float, float]) -> list[tuple[dict, float]]:
    """Test vectors: the first held-out rows scikit-learn approves, reviews and declines, with its probabilities."""
    bands = np.searchsorted(np.array(thresholds), p, side="left")  # 0 approve, 1 review, 2 decline (p > threshold)
    rows = [int(np.flatnonzero(bands == band)[0]) for band in (0, 1, 2) if np.any(bands == band)]
    return [({f: bool(x[i, j]) if f in FLAGS else float(x[i, j]) for j, f in enumerate(FEATURES)}, float(p[i]))
            for i in rows]


def main() -> None:
    """Parse arguments, train, evaluate, export and write the manifest."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("models"))
    args = ap.parse_args()

    columns, y = generate(args.rows, seed=args.seed)
    x = to_matrix(columns)
    cut = int(0.8 * len(y))  # rows are i.i.d., so a plain slice is a fair split
    x_train, x_test, y_train, y_test = x[:cut], x[cut:], y[:cut], y[cut:]

    clf = GradientBoostingClassifier(n_estimators=60, max_depth=3, random_state=args.seed)
    clf.fit(x_train, y_train)
    p = clf.predict_proba(x_test)[:, 1]

    review = best_f1_threshold(y_test, p)
    decline = max(precision_threshold(y_test, p, DECLINE_PRECISION), review)
    print(f"rows {args.rows} (train {cut}, held-out {len(y) - cut}), seed {args.seed}")
    print(f"fraud rate: all {y.mean():.4f}, held-out {y_test.mean():.4f}")
    print(f"held-out AUC {roc_auc_score(y_test, p):.4f}")
    for label, t in (("review", review), ("decline", decline)):
        prec, rec, n = precision_recall(y_test, p, t)
        print(f"{label:8s} p > {t:.2f}: precision {prec:.3f} recall {rec:.3f} "
              f"flagged {n / len(y_test):.4f} of rows")

    onx = to_onnx(
        clf,
        initial_types=[("features", FloatTensorType([None, len(FEATURES)]))],
        options={id(clf): {"zipmap": False}},
        target_opset={"": 15, "ai.onnx.ml": 3},
    )
    assert [o.name for o in onx.graph.output] == ["label", OUTPUT]
    # skl2onnx emits opset_import in set order, which varies with PYTHONHASHSEED.
    opsets = sorted(onx.opset_import, key=lambda o: o.domain)
    del onx.opset_import[:]
    onx.opset_import.extend(opsets)
    data = onx.SerializeToString()
    sha = hashlib.sha256(data).hexdigest()

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.onnx").write_bytes(data)
    manifest = {
        "name": NAME,
        "version": "1.0.0",
        "model_file": f"{NAME}.onnx",
        "sha256": sha,
        "input": "features",
        "output": OUTPUT,
        "output_column": 1,
        "features": [{"source": f, "mean": 0.0, "scale": 1.0} for f in FEATURES],  # trees need no scaling
        "thresholds": {"review": review, "decline": decline},
    }
    (args.out / f"{NAME}.json").write_text(json.dumps(manifest, indent=2) + "\n")
    write_test_vectors(args.out / f"{NAME}.json", vectors(x_test, p, (review, decline)), TOLERANCE)
    print(f"wrote {args.out / NAME}.onnx ({len(data)} bytes) sha256 {sha}")
    print(f"wrote {args.out / NAME}.json")


if __name__ == "__main__":
    main()
