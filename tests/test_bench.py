"""The benchmark harness (bench/run.py) in smoke mode: it runs end to end; its numbers are read, never asserted, except
that the Kafka Streams scorer decides as the worker does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.kafka
def test_bench_smoke_measures_every_contender(tmp_path):
    """`bench/run.py --smoke` drains a small topic with every contender, checks the Streams scorer's decisions against
    the worker's, measures the latency of the worker and the Java copy, and writes JSON, Markdown and PNG."""
    # About two minutes with warm caches; a fresh machine first fetches the broker's jars, builds bench/java with
    # Maven and builds the Quix venv.
    done = subprocess.run([sys.executable, "bench/run.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    contenders = results["contenders"]
    assert set(contenders) == {"worker", "worker_x2", "worker_exactly_once", "worker_challenger", "worker_batch1",
                               "java_copy", "ceiling", "streams_batched", "streams_per_record", "quix_peer"}
    assert contenders["worker_challenger"]["rounds"][0]["shadow_verdicts"] == results["messages"]
    assert all(c["throughput_tps"] > 0 for c in contenders.values())
    # The broker's CPU is read beside each contender's: some drains are shorter than a clock tick, all together not.
    assert sum(c["broker_cpu_us_per_txn"] for c in contenders.values()) > 0
    assert all(c["cores_busy"] >= 0 for c in contenders.values())
    assert len(contenders["worker_x2"]["rounds"][0]["exit_codes"]) == 2
    assert {"worker_x2/worker", "worker_x2/java_copy", "worker/java_copy", "worker/streams_batched"} <= set(
        results["ratios"])
    for name in ("streams_batched", "streams_per_record"):
        accuracy = results["accuracy"][name]
        assert accuracy["matched"] == accuracy["sampled"] > 0, accuracy
        assert accuracy["decision_mismatches"] == 0, accuracy
    rows = {(r["contender"], r["fraction"]) for r in results["latency"]}
    assert rows == {("worker", 0.5), ("java_copy", 0.5), ("worker_exactly_once", 0.5)}
    for row in results["latency"]:
        assert {"p50_ms", "p95_ms", "p99_ms", "p99_9_ms", "max_ms"} <= set(row)
        assert row["latency_samples"] == row["verdicts"] > 0
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {name} |" in table for name in contenders)
    assert (tmp_path / "bench.png").stat().st_size > 0
