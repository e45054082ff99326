"""The peer: a Quix Streams app that decodes Avro transactions, scores each with the ONNX model and produces Avro verdicts."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from quixstreams import Application
from quixstreams.models.serializers.avro import AvroDeserializer, AvroSerializer

ROOT = Path(__file__).resolve().parent.parent


def schema(name: str) -> dict:
    """schemas/<name>.avsc with timestamps read as plain epoch-millisecond longs, as the worker reads them."""
    raw = json.loads((ROOT / "schemas" / f"{name}.avsc").read_text())
    for f in raw["fields"]:
        if isinstance(f["type"], dict) and f["type"].get("logicalType") == "timestamp-millis":
            f["type"] = "long"
    return raw


def scorer(manifest_path: Path):
    """A function from a decoded transaction to a verdict dict, with the manifest's preprocessing and thresholds."""
    m = json.loads(manifest_path.read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(manifest_path.parent / m["model_file"]), options, providers=["CPUExecutionProvider"])
    sources = [f["source"] for f in m["features"]]
    mean = np.array([f.get("mean", 0.0) for f in m["features"]])
    scale = np.array([f.get("scale", 1.0) for f in m["features"]])
    review, decline = m["thresholds"]["review"], m["thresholds"]["decline"]
    outputs, name, col = [m["output"]], m["input"], m.get("output_column", 0)

    def score(txn: dict) -> dict:
        """Score one transaction (booleans as 0/1, (x - mean) / scale in float64, then float32)."""
        x = ((np.array([float(txn[s]) for s in sources]) - mean) / scale).astype(np.float32)[None, :]
        p = float(session.run(outputs, {name: x})[0][0, col])
        decision = "DECLINE" if p > decline else "REVIEW" if p > review else "APPROVE"
        return {"transaction_id": txn["transaction_id"], "card_id": txn["card_id"], "fraud_probability": p,
                "is_fraud": decision == "DECLINE", "decision": decision, "review_threshold": review,
                "decline_threshold": decline, "model_name": m["name"], "model_version": m["version"],
                "event_time": txn["event_time"], "scored_at": int(time.time() * 1000)}

    return score


class _Assigned(logging.Handler):
    """Prints `assigned` once Quix has partitions, so the harness knows when start-up is over."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Rebalancing: assigning"):
            print("assigned", flush=True)


def main() -> None:
    """Command line: quix_peer.py BOOTSTRAP GROUP SOURCE TARGET; runs until SIGTERM."""
    p = argparse.ArgumentParser(description=__doc__)
    for arg in ("bootstrap", "group", "source", "target"):
        p.add_argument(arg)
    p.add_argument("--manifest", default=str(ROOT / "models" / "fraud-gbt.json"))
    a = p.parse_args()
    app_log = logging.getLogger("quixstreams.app")
    app_log.setLevel(logging.DEBUG)
    app_log.addHandler(_Assigned())
    app = Application(
        broker_address=a.bootstrap, consumer_group=a.group, auto_offset_reset="earliest",
        processing_guarantee="at-least-once", state_dir=tempfile.mkdtemp(prefix="quix-state-"), loglevel="WARNING",
        # The worker's producer settings, so that only the processing model differs.
        producer_extra_config={"enable.idempotence": True, "acks": "all", "linger.ms": 5, "compression.type": "lz4"},
    )
    source = app.topic(a.source, key_deserializer="bytes", value_deserializer=AvroDeserializer(schema("transaction")))
    target = app.topic(a.target, key_serializer="bytes", value_serializer=AvroSerializer(schema("verdict")))
    app.dataframe(source).apply(scorer(Path(a.manifest))).to_topic(target)
    app.run()


if __name__ == "__main__":
    main()
