"""Bad start-up: one clear error line, a non-zero exit, and nothing consumed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kafkatools import committed_offsets
from tests.models import zipmap_model

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


def _unscaled_reference(tmp_path: Path) -> Path:
    """The reference model's manifest with its scaler left out (mean 0, scale 1), as its tutorial's first client did."""
    data = json.loads((ROOT / "models" / "reference-fraud-mlp.json").read_text())
    data["model_file"] = str((ROOT / "models" / data["model_file"]).resolve())
    data["features"] = [{"source": f["source"], "mean": 0.0, "scale": 1.0} for f in data["features"]]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    return path


def _skl2onnx_default_export(tmp_path: Path) -> Path:
    """A scikit-learn classifier exported with skl2onnx's default options (outputs `output_label`, ZipMap)."""
    blob = zipmap_model(zipmap=True)
    (tmp_path / "skl.onnx").write_bytes(blob)
    return _copy_model(tmp_path, model_file="skl.onnx", sha256=hashlib.sha256(blob).hexdigest(),
                       output="output_probability", input="X", test_vectors=[])


RAW = [{"source": f["source"], "mean": 0.0, "scale": 1.0} for f in json.loads(MANIFEST.read_text())["features"]]
CASES = {
    "missing model file": (lambda tmp: _copy_model(tmp, model_file="nope.onnx"), "model file not readable"),
    "sha256 mismatch": (_corrupt, "has sha256"),
    "unknown input tensor": (lambda tmp: _copy_model(tmp, input="dense_input"), "is not a model input"),
    "unknown feature field": (lambda tmp: _copy_model(tmp, features=[{**RAW[0], "source": "shoe_size"}] * 7),
                              "unknown feature source"),
    "missing manifest": (lambda tmp: tmp / "absent.json", "model manifest not found"),
    # The manifest mistakes, each of which used to pass and then score wrongly.
    "output column not chosen": (lambda tmp: _copy_model(tmp, output_column=None), "has 2 columns"),
    "output column of the legitimate class": (lambda tmp: _copy_model(tmp, output_column=0),
                                              "the manifest expects 0.0211878"),
    "class label output": (lambda tmp: _copy_model(tmp, output="label"),
                           "class labels, not a probability; use the probability output 'probabilities'"),
    "standardisation not stated": (lambda tmp: _copy_model(tmp, features=[{"source": f["source"]} for f in RAW]),
                                   "state the standardisation with `mean` and `scale`"),
    "reference model without its scaler": (_unscaled_reference, "test vector 0"),
    "skl2onnx default export": (_skl2onnx_default_export, "options={'zipmap': False}"),
}


@pytest.mark.kafka
@pytest.mark.parametrize("command", ["run", "check"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_model_stops_start_up_before_consuming(case, command, settings_for, tmp_path):
    """A missing, corrupt, mismatched or misdescribed model stops `run` and `check` with one error line, exit 2, and
    no committed offset."""
    make_manifest, needle = CASES[case]
    s = settings_for(partitions=1, model_manifest=make_manifest(tmp_path))
    done = _command(command, s.to_env())
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


def _command(command: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
    return subprocess.run([sys.executable, "-m", "worker", command], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=timeout)


def _one_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("fraud-worker: "), done.stderr
    return lines[0]


@pytest.mark.kafka
@pytest.mark.parametrize("command", ["run", "check"])
@pytest.mark.parametrize("config", [
    ("FRAUD_CONSUMER_CONFIG", '{"enable.auto.commit": "true"}', "enable.auto.commit"),
    ("FRAUD_CONSUMER_CONFIG", '{"enable.auto.offset.store": true}', "enable.auto.offset.store"),
    ("FRAUD_CONSUMER_CONFIG", '{"auto.offset.reset": "latest"}', "auto.offset.reset"),
    ("FRAUD_PRODUCER_CONFIG", '{"acks": 1}', "acks"),
    ("FRAUD_PRODUCER_CONFIG", '{"enable.idempotence": "false"}', "enable.idempotence"),
    ("FRAUD_CONSUMER_CONFIG", '{"group.protocol": "consumer"}', "group.protocol"),
    ("FRAUD_PRODUCER_CONFIG", '{"no.such.key": "1"}', "no.such.key"),
    ("FRAUD_PRODUCER_CONFIG", '{"linger.ms": "soon"}', "queue.buffering.max.ms"),  # librdkafka's name for it
], ids=lambda c: c[2])
def test_guarded_or_invalid_client_setting_is_one_line_and_exit_2(command, config, settings_for):
    """A setting that weakens at-least-once, or one librdkafka refuses, stops `run` and `check` with one line and exit 2."""
    variable, value, needle = config
    s = settings_for(partitions=1)
    line = _one_line(_command(command, {**s.to_env(), variable: value, "FRAUD_STARTUP_TIMEOUT_S": "5"}))
    assert needle in line
    assert committed_offsets(s) == {0: -1001}


@pytest.mark.kafka
def test_check_runs_the_start_up_path(settings_for):
    """`check` reaches the broker and finds the topics: it passes on a good setup and names a missing topic."""
    s = settings_for(partitions=1)
    done = _command("check", s.to_env())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["topics"] == [s.input_topic, s.verdict_topic, s.dead_letter_topic]
    line = _one_line(_command("check", {**s.to_env(), "FRAUD_DEAD_LETTER_TOPIC": "absent-dlq-x",
                                        "FRAUD_STARTUP_TIMEOUT_S": "3"}))
    assert "absent-dlq-x" in line


@pytest.mark.parametrize("servers", ["127.0.0.1:1", "no-such-host.invalid:9092"])
def test_check_fails_for_an_unreachable_broker(servers):
    """`check` against a closed port or an unresolvable host fails with one line naming the broker."""
    line = _one_line(_command("check", {"FRAUD_BOOTSTRAP_SERVERS": servers, "FRAUD_STARTUP_TIMEOUT_S": "3"}))
    assert "cannot reach Kafka" in line and servers in line


@pytest.mark.kafka
@pytest.mark.parametrize("protocol", ["SSL", "SASL_SSL", "SASL_PLAINTEXT"])
def test_check_fails_for_a_wrong_security_protocol(protocol, settings_for):
    """`check` with a TLS or SASL protocol against a PLAINTEXT listener fails with one line, within the start-up timeout."""
    s = settings_for(partitions=1)
    env = {**s.to_env(), "FRAUD_SECURITY_PROTOCOL": protocol, "FRAUD_STARTUP_TIMEOUT_S": "5"}
    if protocol.startswith("SASL"):
        env |= {"FRAUD_SASL_MECHANISM": "SCRAM-SHA-512", "FRAUD_SASL_USERNAME": "u", "FRAUD_SASL_PASSWORD": SECRET}
    done = _command("check", env)
    line = _one_line(done)
    assert ("TLS with Kafka failed" if protocol.endswith("SSL") else "authentication failed") in line, line
    assert SECRET not in done.stderr + done.stdout


@pytest.mark.kafka
def test_unreachable_schema_registry_is_one_line_and_exit_2(settings_for):
    """A configured registry that does not answer stops `run` and `check` with one line naming it, never the password."""
    s = settings_for(partitions=1)
    env = {**s.to_env(), "FRAUD_SCHEMA_REGISTRY_URL": "http://127.0.0.1:1/apis/ccompat/v7",
           "FRAUD_SCHEMA_REGISTRY_USERNAME": "u", "FRAUD_SCHEMA_REGISTRY_PASSWORD": SECRET, "FRAUD_STARTUP_TIMEOUT_S": "2"}
    for command in ("run", "check"):
        done = _command(command, env)
        assert "Schema Registry at http://127.0.0.1:1" in _one_line(done)
        assert SECRET not in done.stderr + done.stdout
    assert committed_offsets(s) == {0: -1001}


@pytest.mark.kafka
def test_metrics_port_in_use_stops_before_the_transactional_id_is_registered(settings_for):
    """A `run` that cannot bind its metrics port exits 2 before init_transactions, so it fences no live replica."""
    import socket

    s = settings_for(partitions=1, delivery="exactly_once", group_instance_id="pod-0")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = s.to_env() | {"FRAUD_METRICS_PORT": str(taken.getsockname()[1])}
        done = _run(env)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "metrics server cannot bind" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "transactions_initialised" not in done.stdout


_SIGNAL_WHILE_LOGGING = """
import os, signal, sys
import structlog._output
from worker import app, cli, logs

def run(self):
    with structlog._output._get_lock_for_file(logs.STDOUT):  # the main thread is writing a log line
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(1000))  # the handler runs here, between bytecodes
    return 0 if self.stop.is_set() else 3

app.Worker.start = lambda self, **kwargs: None
app.Worker.run = run
sys.exit(cli.main(["run"]))
"""


def test_a_stop_signal_while_a_log_line_is_written_stops_the_worker():
    """SIGTERM arriving while the loop holds the log's write lock sets the stop event; a handler that logged would
    deadlock on that lock (seen as a replica ignoring SIGTERM mid-stream)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
    done = subprocess.run([sys.executable, "-c", _SIGNAL_WHILE_LOGGING], cwd=ROOT, env={**clean, "FRAUD_METRICS_PORT": "0"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
