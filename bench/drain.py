"""Drain throughput and CPU per message of the worker of one checkout, for A/B runs across commits.

    .venv/bin/python bench/drain.py --prefill 600000 --topic ab-src        # once: fill a 6-partition topic
    .venv/bin/python bench/drain.py --tree /path/to/checkout --topic ab-src # drain it with that checkout's worker

Each drain uses a fresh group and fresh output topics on FRAUD_BOOTSTRAP_SERVERS (default 127.0.0.1:9092) and
prints one JSON line: wall seconds, process CPU seconds (all threads, start-up included), CPU µs/msg and msg/s.
Alternate trees in one run and compare ratios: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    p.add_argument("--topic", required=True)
    p.add_argument("--prefill", type=int, default=0, help="fill --topic with this many transactions, then exit")
    a = p.parse_args()
    sys.path.insert(0, str(a.tree))
    os.chdir(a.tree)
    from worker.app import Worker
    from worker.kafka import create_topics, end_offsets, plain_producer
    from worker.model.scorer import OnnxScorer
    from worker.settings import Settings
    from worker.tools import traffic

    conf = {"bootstrap.servers": os.environ.get("FRAUD_BOOTSTRAP_SERVERS", "127.0.0.1:9092")}
    if a.prefill:
        create_topics(conf, {a.topic: 6})
        now = int(time.time() * 1000)
        txns = (traffic.stamp(t, now) for t in traffic.generated(a.prefill, seed=1))
        print(json.dumps({"prefilled": traffic.produce(plain_producer(conf), a.topic, txns), "topic": a.topic}))
        return
    run = uuid.uuid4().hex[:8]
    s = Settings(bootstrap_servers=conf["bootstrap.servers"], group_id=f"drain-{run}", input_topic=a.topic,
                 verdict_topic=f"drain-{run}-v", dead_letter_topic=f"drain-{run}-d", metrics_port=0,
                 log_level="WARNING", _env_file=None)
    create_topics(conf, {s.verdict_topic: 6, s.dead_letter_topic: 6})
    total = sum(end_offsets(conf, a.topic).values())
    worker = Worker(s, OnnxScorer.load(s.model_manifest))
    thread = threading.Thread(target=worker.run, daemon=True)
    cpu0, wall0 = time.process_time(), time.monotonic()
    thread.start()
    while sum(worker.tracker.safe_positions().values()) < total:
        time.sleep(0.1)
    wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    worker.stop.set()
    thread.join(60)
    print(json.dumps({"tree": str(a.tree), "messages": total, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                      "cpu_us_per_msg": round(cpu / total * 1e6, 2), "msg_per_s": round(total / wall)}))


if __name__ == "__main__":
    main()
