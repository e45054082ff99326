"""The end-to-end demo: fresh topics, a worker process, sample traffic, every verdict read back, a summary."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..avro.codec import Codec
from ..avro.registry import input_prefix
from ..kafka import client_config, create_topics, end_offsets, iter_topic, plain_producer
from ..settings import Settings, load_settings
from . import traffic
from .replica import Replica


def read_verdicts(settings: Settings, idle_s: float = 5.0) -> Iterator[tuple[dict, float]]:
    """Yield (verdict, arrival time) from the start of the verdict topic until it has been idle for `idle_s`."""
    codec = Codec()
    for record in iter_topic(client_config(settings), settings.verdict_topic, idle_s):
        if record is not None:
            yield codec.decode_verdict(record.value), time.time()


def run_demo(count: int, rate: float) -> int:
    """Run the demo against FRAUD_BOOTSTRAP_SERVERS; print the summary; return the worker's exit code."""
    base = load_settings()
    run = time.strftime("%Y%m%d-%H%M%S")
    topics = {"input_topic": f"demo-{run}-transactions", "verdict_topic": f"demo-{run}-verdicts",
              "dead_letter_topic": f"demo-{run}-dlq"}
    settings = base.model_copy(update={**topics, "group_id": f"demo-{run}"})
    create_topics(client_config(settings), {t: 6 for t in topics.values()})
    log_path = Path("var") / f"demo-{run}-worker.log"
    print(f"demo {run}: worker log in {log_path}, producing {count:,} transactions at {rate:,.0f}/s to {settings.bootstrap_servers}")
    worker = Replica(settings.model_copy(update={"metrics_port": 0}), log_path)
    if not worker.wait_assigned(60):
        worker.kill()
        print(f"demo FAILED: the worker did not join the group; see {log_path}")
        return 1
    started = time.time()
    producer = plain_producer(client_config(settings))
    prefix = input_prefix(settings.registry_config(), settings.input_topic, Codec().transaction_avsc)
    sender = threading.Thread(
        target=traffic.produce, args=(producer, settings.input_topic, traffic.generated(count, prefix=f"demo-{run}"), rate),
        kwargs={"prefix": prefix},
    )
    sender.start()
    seen: set[str] = set()
    latencies, decisions, duplicates, fraud = [], Counter(), 0, 0
    first = last = None
    deadline = time.monotonic() + count / max(rate, 1.0) + 120
    for verdict, arrival in read_verdicts(settings, idle_s=30.0):
        if verdict["transaction_id"] in seen:
            duplicates += 1
            continue
        seen.add(verdict["transaction_id"])
        first = first or arrival
        last = arrival
        latencies.append(arrival - verdict["event_time"] / 1000.0)
        decisions[verdict["decision"]] += 1
        fraud += verdict["is_fraud"]
        if len(seen) >= count or time.monotonic() > deadline or not worker.alive():
            break
    sender.join()
    code = worker.terminate(60)
    dead = sum(end_offsets(client_config(settings), topics["dead_letter_topic"]).values())
    ms = np.percentile(np.array(latencies) * 1000.0, [50, 99]) if latencies else [float("nan")] * 2
    span = (last - started) if last else float("nan")
    rows = [
        ("transactions produced", f"{count:,} ({'Schema Registry wire format' if prefix else 'plain Avro'})"),
        # read_committed only matters to what a reader sees of exactly-once output (no aborted transactions).
        ("delivery", settings.delivery + (" (verdicts read with isolation.level=read_committed)"
                                          if settings.delivery == "exactly_once" else "")),
        ("verdicts (unique)", f"{len(seen):,}"),
        ("duplicate verdicts", f"{duplicates:,}"),
        ("dead letters", f"{dead:,}"),
        ("fraud rate (is_fraud)", f"{fraud / max(len(seen), 1):.2%}"),
        ("decisions", ", ".join(f"{k} {v:,}" for k, v in sorted(decisions.items()))),
        ("throughput", f"{len(seen) / span:,.0f} verdicts/s over {span:.1f}s (offered {rate:,.0f}/s)"),
        ("end-to-end latency", f"p50 {ms[0]:.1f} ms, p99 {ms[1]:.1f} ms"),
        ("worker exit code", f"{code} (after SIGTERM)"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    ok = len(seen) == count and code == 0
    print("demo OK: every transaction has a verdict" if ok else "demo FAILED: see the worker log")
    return 0 if ok else 1
