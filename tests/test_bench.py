"""The benchmark harness (bench/run.py) in smoke mode: it runs end to end; its numbers are read, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.kafka
def test_bench_smoke_measures_every_contender(tmp_path):
    """`bench/run.py --smoke` drains a small topic with every contender, measures latency and writes JSON and PNG."""
    # About a minute with warm caches; a fresh machine first fetches the broker's jars and builds the Quix venv.
    done = subprocess.run([sys.executable, "bench/run.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["contenders"]) == {"worker", "worker_exactly_once", "worker_challenger", "ceiling",
                                          "worker_batch1", "quix_peer"}
    assert results["contenders"]["worker_challenger"]["rounds"][0]["shadow_verdicts"] == results["messages"]
    assert all(c["throughput_tps"] > 0 for c in results["contenders"].values())
    assert {r["contender"] for r in results["latency"]} == {"worker", "worker_exactly_once"}
    assert (tmp_path / "bench.png").stat().st_size > 0
