"""`fraud-worker demo`, the README's main command, end to end on the real broker."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.kafka


def test_demo_scores_every_transaction_once(kafka_bootstrap, tmp_path):
    """The demo produces, scores and reads back every transaction: one verdict each, no dead letters, exit 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
    env["FRAUD_BOOTSTRAP_SERVERS"] = kafka_bootstrap
    done = subprocess.run([sys.executable, "-m", "worker", "demo", "--count", "2000", "--rate", "2000"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    rows = dict(re.findall(r"^(\S[^\n]*?)  +(\S[^\n]*)$", done.stdout, re.M))
    assert done.returncode == 0, done.stdout + done.stderr
    assert rows["verdicts (unique)"] == "2,000" and rows["duplicate verdicts"] == "0" and rows["dead letters"] == "0"
    assert rows["worker exit code"].startswith("0 ")
    assert done.stdout.rstrip().endswith("demo OK: every transaction has a verdict")
    assert list(tmp_path.glob("var/demo-*-worker.log"))
