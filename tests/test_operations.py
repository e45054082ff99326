"""Operations on the real broker: metrics and health from a running worker, JSON logs, SASL/SCRAM, no secret leaks."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.kafkatools import WorkerProcess, end_offsets, produce_raw, produce_transactions, read_topic, wait_until
from worker.kafka import create_topics
from worker.tools import traffic
from worker.tools.localbroker import BrokerError, LocalBroker
from worker.tools.localservice import free_ports

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parent.parent
SASL_USER, SASL_PASSWORD = "fraud-worker", "Sc7am-pa55word-never-logged"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _metric(text: str, name: str, labels: str = "", required: bool = True) -> float | None:
    """Sum of the samples of a metric whose label set contains `labels` (None if absent and not required)."""
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m and labels in (m.group(1) or ""):
            total, found = total + float(m.group(2)), True
    assert found or not required, f"metric {name}{{{labels}}} not exported"
    return total if found else None


def test_metrics_health_and_logs_from_a_running_worker(settings_for, tmp_path):
    """Counters, histograms, lag, commits, fraud rate and model info move with traffic; health answers; logs are JSON."""
    port = _free_port()
    s = settings_for(partitions=3, metrics_port=port)
    w = WorkerProcess(s, tmp_path / "w.log")
    assert w.wait_assigned(), w.log()[-2000:]
    wait_until(lambda: _get(port, "/readyz")[0] == 200, 30, "/readyz to turn ready")
    status, body = _get(port, "/healthz")
    assert status == 200 and json.loads(body)["ok"] is True
    before = _get(port, "/metrics")[1]
    assert _metric(before, "fraud_worker_transactions_consumed_total") == 0
    produce_transactions(s, traffic.generated(3_000, seed=8, prefix="ops"))
    produce_raw(s, [(b"poison", b"\x01\x02", None)])
    wait_until(lambda: _metric(_get(port, "/metrics")[1], "fraud_worker_transactions_consumed_total") >= 3_001,
               60, "every message consumed")
    wait_until(lambda: _metric(_get(port, "/metrics")[1], "fraud_worker_consumer_lag", required=False) == 0, 30, "lag of 0")
    text = _get(port, "/metrics")[1]
    verdicts = sum(_metric(text, "fraud_worker_verdicts_total", f'decision="{d}"') for d in ("APPROVE", "REVIEW", "DECLINE")
                   if f'decision="{d}"' in text)
    assert verdicts == 3_000
    assert _metric(text, "fraud_worker_dead_letters_total", 'stage="deserialize"') == 1
    assert _metric(text, "fraud_worker_batch_size_count") >= 1
    assert _metric(text, "fraud_worker_batch_size_sum") == 3_001
    assert _metric(text, "fraud_worker_end_to_end_seconds_count") == 3_000
    assert _metric(text, "fraud_worker_commits_total") >= 1
    assert _metric(text, "fraud_worker_assigned_partitions") == 3
    assert 0.0 < _metric(text, "fraud_worker_fraud_rate") < 0.2
    assert _metric(text, "fraud_worker_model_info", 'name="fraud-gbt"') == 1
    assert re.search(r'fraud_worker_model_info\{.*sha256="[0-9a-f]{64}"', text)
    assert w.terminate() == 0
    lines = [json.loads(line) for line in w.log().splitlines()]
    assert all(line["worker_id"] == s.worker_id and line["group"] == s.group_id for line in lines)
    events = {line["event"] for line in lines}
    assert {"worker_started", "partitions_assigned", "progress", "partitions_revoked", "worker_stopped"} <= events
    assert "batch_scored" not in events  # one line per batch is DEBUG: at batch size 1 it would be one per message
    progress = [line for line in lines if line["event"] == "progress"]
    assert sum(line["consumed"] for line in progress) == 3_001
    assert sum(line["verdicts"] for line in progress) == 3_000
    assert sum(line["dead_letters"] for line in progress) == 1
    assert all(line["batches"] >= 1 and line["mean_batch_ms"] > 0 for line in progress)


@pytest.fixture(scope="session")
def sasl_broker(tmp_path_factory) -> LocalBroker:
    """A local broker with a SASL_PLAINTEXT SCRAM-SHA-512 listener and one SCRAM user, created at format time."""
    port, controller, sasl_port = free_ports(3)  # chosen at run time, so sessions on one machine never collide
    broker = LocalBroker(port=port, controller_port=controller, sasl_port=sasl_port,
                         home=tmp_path_factory.mktemp("broker-sasl"), scram_users={SASL_USER: SASL_PASSWORD})
    try:
        broker.start()
    except BrokerError as exc:
        pytest.fail(f"{exc}. The SASL tests need the project's local broker: install Java 17+ and Maven.", pytrace=False)
    yield broker
    broker.stop()


def _sasl_settings(settings_for, broker: LocalBroker, password: str, **overrides):
    s = settings_for(create=False, **overrides).model_copy(update={
        "bootstrap_servers": f"127.0.0.1:{broker.sasl_port}", "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": SASL_USER, "sasl_password": password,
        "startup_timeout_s": 10})
    create_topics({"bootstrap.servers": broker.bootstrap}, {s.input_topic: 2, s.verdict_topic: 2, s.dead_letter_topic: 2})
    return s


def test_sasl_scram_right_credentials_score_and_never_leak(settings_for, sasl_broker, tmp_path):
    """With the right SCRAM credentials the worker scores over SASL, and the password is in no log line or metric."""
    port = _free_port()
    s = _sasl_settings(settings_for, sasl_broker, SASL_PASSWORD, metrics_port=port, log_level="DEBUG")
    w = WorkerProcess(s, tmp_path / "sasl.log")
    assert w.wait_assigned(), w.log()[-2000:]
    plain = s.model_copy(update={"bootstrap_servers": sasl_broker.bootstrap})
    produce_transactions(plain, traffic.generated(500, seed=4, prefix="sasl"))
    assert len(read_topic(plain, s.verdict_topic, 500, timeout=60)) == 500
    metrics = _get(port, "/metrics")[1]
    assert w.terminate() == 0
    assert SASL_PASSWORD not in w.log() + metrics
    assert '"worker_started"' in w.log()


def test_sasl_wrong_password_is_one_line_without_the_password(settings_for, sasl_broker):
    """A wrong password stops start-up with exit 2 and one line that names the failure but not the password."""
    wrong = "Wr0ng-pa55word-also-secret"
    s = _sasl_settings(settings_for, sasl_broker, wrong, metrics_port=0)
    done = subprocess.run([sys.executable, "-m", "worker", "run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", **s.to_env()})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "authentication failed" in lines[0].lower(), done.stderr
    assert wrong not in done.stderr + done.stdout and SASL_PASSWORD not in done.stderr + done.stdout
    assert sum(end_offsets(s.model_copy(update={"bootstrap_servers": sasl_broker.bootstrap}), s.verdict_topic).values()) == 0
