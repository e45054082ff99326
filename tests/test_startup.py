"""Bad start-up: one clear error line, a non-zero exit, and nothing consumed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kafkatools import committed_offsets

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "models" / "fraud-gbt.json"
SECRET = "s3cr3t-Hunter2-do-not-print"


def _run(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
    return subprocess.run([sys.executable, "-m", "worker", "run"], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=timeout)


def _copy_model(tmp_path: Path, **manifest_changes) -> Path:
    shutil.copy(ROOT / "models" / "fraud-gbt.onnx", tmp_path / "fraud-gbt.onnx")
    data = json.loads(MANIFEST.read_text()) | manifest_changes
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    return path


def _corrupt(tmp_path: Path) -> Path:
    path = _copy_model(tmp_path)
    model = tmp_path / "fraud-gbt.onnx"
    blob = bytearray(model.read_bytes())
    blob[100] ^= 0xFF
    model.write_bytes(bytes(blob))
    return path


CASES = {
    "missing model file": (lambda tmp: _copy_model(tmp, model_file="nope.onnx"), "model file not readable"),
    "sha256 mismatch": (_corrupt, "has sha256"),
    "unknown input tensor": (lambda tmp: _copy_model(tmp, input="dense_input"), "is not a model input"),
    "unknown feature field": (lambda tmp: _copy_model(tmp, features=[{"source": "shoe_size"}] * 7), "unknown feature source"),
    "missing manifest": (lambda tmp: tmp / "absent.json", "model manifest not found"),
}


@pytest.mark.kafka
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_model_stops_start_up_before_consuming(case, settings_for, tmp_path):
    """A missing, corrupt or mismatched model gives one error line, exit 2, and no committed offset."""
    make_manifest, needle = CASES[case]
    s = settings_for(partitions=1, model_manifest=make_manifest(tmp_path))
    done = _run(s.to_env())
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2
    assert len(lines) == 1 and lines[0].startswith("fraud-worker: ") and needle in lines[0], done.stderr
    assert committed_offsets(s) == {0: -1001}


def test_invalid_setting_is_one_line_without_the_secret():
    """An invalid value and an unknown FRAUD_ variable are named in one line that never echoes the password."""
    done = _run({"FRAUD_BATCH_MAX_SIZE": "0", "FRAUD_BATCH_SIZE": "9", "FRAUD_SASL_PASSWORD": SECRET})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "FRAUD_BATCH_SIZE" in done.stderr
    done = _run({"FRAUD_BATCH_MAX_SIZE": "0", "FRAUD_SASL_PASSWORD": SECRET})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "FRAUD_BATCH_MAX_SIZE" in done.stderr
    assert SECRET not in done.stderr + done.stdout


def test_unreachable_broker_is_one_clear_line():
    """A broker that does not answer stops start-up within the start-up timeout with one line naming it."""
    done = _run({"FRAUD_BOOTSTRAP_SERVERS": "127.0.0.1:1", "FRAUD_STARTUP_TIMEOUT_S": "3", "FRAUD_METRICS_PORT": "0"})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("fraud-worker: ") and "cannot reach Kafka" in lines[-1], done.stderr


@pytest.mark.kafka
def test_missing_topic_is_one_clear_line(settings_for):
    """A verdict topic that does not exist stops start-up and says how to create it."""
    s = settings_for(partitions=1).model_copy(update={"verdict_topic": "no-such-topic-xyz", "startup_timeout_s": 3})
    done = _run(s.to_env())
    assert done.returncode == 2
    assert "no-such-topic-xyz" in done.stderr and "fraud-worker topics" in done.stderr
