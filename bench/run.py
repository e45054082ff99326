"""Benchmark: drain one pre-filled topic with the worker, its references and peers; then open-loop latency.

    .venv/bin/python bench/run.py [--messages 500000] [--partitions 6] [--out bench/results] [--smoke]

It starts its own broker on 127.0.0.1:59092, fills a topic with M Avro transactions, then drains it with each
contender in turn (fresh group, fresh output topics, one contender at a time): the worker and its variants, two
worker replicas in one group, a Python copy loop, a Java copy loop (the client ceiling), a Kafka Streams scorer
(micro-batched and per record, checked against the worker's verdicts) and a Quix Streams scorer. Then it measures
the end-to-end latency of the worker and of the Java copy at 25/50/75 % of the worker's drain throughput. The Java
contenders live in bench/java (a Maven project), built here when their jar is missing or older than a source. It
writes results.json, results.md and bench.png to --out.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402
from confluent_kafka.admin import NewTopic  # noqa: E402

from worker.tools import traffic  # noqa: E402
from worker.avro.codec import Codec  # noqa: E402
from worker.kafka import QUIET_LOG, admin, committed_offsets, plain_producer, send  # noqa: E402
from worker.settings import Settings  # noqa: E402
from worker.tools.localbroker import CACHE, KAFKA_VERSION, LocalBroker  # noqa: E402
from worker.tools.replica import Replica  # noqa: E402

PORT = 59092
QUIX_VENV = ROOT / "bench" / ".venv-quix"
QUIX_PACKAGES = ["quixstreams>=3.20,<4", "fastavro", "onnxruntime", "numpy"]
JAVA_DIR = ROOT / "bench" / "java"
JAR = JAVA_DIR / "target" / "fraud-bench.jar"
# Every JVM contender: a 512 MiB heap cap (the JVM's default is a quarter of the machine's memory), default GC (G1).
JVM_OPTIONS = ["-Xmx512m"]
JVM_WARMUP_S = 10.0  # before the Java copy's latency is measured (3 s for the worker, which compiles nothing)
# Before a Java contender joins its group, its JVM handles this many records of a warm-up topic (at most --messages):
# a drain of a few seconds would otherwise measure the JIT compiler as much as the client.
JVM_WARMUP_RECORDS = 200_000
MANIFEST = ROOT / "models" / "fraud-gbt.json"
CONTENDERS = ("worker", "worker_x2", "worker_exactly_once", "worker_challenger", "worker_batch1", "java_copy",
              "ceiling", "streams_batched", "streams_per_record", "quix_peer")
# One line per contender for the table.
WHAT = {
    "worker": "the worker, defaults, one process",
    "worker_x2": "two worker replicas in one group (sum of both processes)",
    "worker_exactly_once": "the worker, FRAUD_DELIVERY=exactly_once",
    "worker_challenger": "the worker plus the reference MLP in shadow, shadow topic",
    "worker_batch1": "the worker, FRAUD_BATCH_MAX_SIZE=1",
    "java_copy": "Java kafka-clients copy of the raw bytes: the client ceiling",
    "ceiling": "Python confluent-kafka copy of the raw bytes",
    "streams_batched": "Kafka Streams scorer, ≤ 1000 records or 5 ms per session.run",
    "streams_per_record": "Kafka Streams scorer, one session.run per record",
    "quix_peer": "Quix Streams scorer, one session.run per record",
}
# Worker contenders: their settings beyond the defaults. The challenger (the reference MLP beside the default trees)
# also writes its verdicts to a shadow topic of its own.
WORKERS = {"worker": {}, "worker_profiled": {}, "worker_x2": {}, "worker_batch1": {"batch_max_size": 1},
           "worker_exactly_once": {"delivery": "exactly_once"},
           "worker_challenger": {"challenger_manifest": ROOT / "models" / "reference-fraud-mlp.json"}}
COPIES = ("ceiling", "java_copy")  # contenders whose output is the input's bytes, with no dead-letter topic
STREAMS = {"streams_batched": "batched", "streams_per_record": "per-record"}
ACCURACY_SAMPLE = 1000
# A decision may differ from the worker's only where the two probabilities straddle a threshold by float noise.
NOISE = 1e-5
METHOD = {
    "throughput": "outputs / (last - first output broker timestamp); output topics use LogAppendTime; exactly-once: "
                  "committed outputs (read_committed), progress followed by the group's committed offsets; "
                  "worker_x2: a copy of the input written in one open transaction, committed (made visible to the "
                  "read_committed replicas) once both replicas own partitions, so that neither drains alone",
    "cpu": "utime+stime of the child (all threads; JVM: the whole JVM) from /proc/<pid>/stat when the last output is "
           "on the broker, minus the same at the moment the child reported its partition assignment (start-up, and "
           f"a Java contender's warm-up on {JVM_WARMUP_RECORDS:,} records of another topic before it joins, "
           "excluded); worker_x2: both processes, from the moment both own partitions and the input is made visible",
    "broker_cpu": "the broker process's utime+stime over the same interval, per transaction; cores busy = (contender "
                  "CPU + broker CPU) / that interval's wall time, out of the machine's cores (the harness's probe "
                  "and the operating system use the rest)",
    "jvm": f"{' '.join(JVM_OPTIONS)}, default GC (G1); before joining its group a Java contender copies or scores "
           f"{JVM_WARMUP_RECORDS:,} records (at most --messages) of a warm-up topic with clients (or an application) "
           "of their own, so that the drain measures compiled code",
    "rss": "VmHWM from /proc/<pid>/status at the end (worker_x2: the sum of both); VmRSS sampled every second from "
           "assignment to the last output",
    "latency": "output arrival at a consumer (time.time()) minus the output's event_time, which an open-loop sender "
               "sets to the transaction's scheduled send time (so sender lag counts as latency; event_time is whole "
               "milliseconds, floored, so a latency reads up to 1 ms high); the worker's output is its verdict, the "
               "Java copy's the copied transaction; every output is recorded in an HdrHistogram (microseconds, 3 "
               "significant digits), decoded after the phase so that the reader costs the machine little while it "
               "runs; sender, reader, contender and broker share the machine's cores; a warm-up at the lowest rate "
               "precedes the measured rates: 3 s for the worker, 10 s for the Java copy (the JVM compiles its hot "
               "code in the first seconds)",
    "accuracy": f"up to {ACCURACY_SAMPLE} verdicts of each Kafka Streams contender (the first of each partition) "
                "and the worker's verdicts for the same transaction ids: max |probability difference| and decision "
                f"mismatches; a mismatch further than {NOISE} from both thresholds fails the run",
}


@dataclass
class Child:
    """A contender's process: it has partitions once `marker` appears in its log (or, with `owned`, once that set is
    not empty); `stop` ends it and returns its code."""

    proc: subprocess.Popen
    log_path: Path
    marker: str
    stop: Callable[[], int]
    owned: Callable[[], set] | None = None

    def ready(self) -> bool:
        """Whether the process owns partitions."""
        if self.owned is not None:
            return bool(self.owned())
        return self.log_path.exists() and self.marker in self.log_path.read_text(errors="replace")


def start_worker(bootstrap: str, name: str, source: str, outs: list[str], logs: Path, group: str | None = None,
                 **overrides) -> Child:
    """The worker as `python -m worker run` (worker.tools.replica.Replica) with default settings plus `overrides`."""
    s = Settings(bootstrap_servers=bootstrap, group_id=group or outs[0], input_topic=source, verdict_topic=outs[0],
                 dead_letter_topic=outs[1], worker_id=name, metrics_port=0, **overrides)
    replica = Replica(s, logs / f"{name}.log")
    return Child(replica.proc, replica.log_path, "partitions_assigned", lambda: replica.terminate(120), replica.owned)


def _child(cmd: list[str], log_path: Path, env: dict | None = None) -> Child:
    """A command as a child process, its output in `log_path`; it prints `assigned` once it has partitions."""
    out = open(log_path, "ab")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})

    def stop() -> int:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(10)
        finally:
            out.close()

    return Child(proc, log_path, "assigned", stop)


def start_script(python: str, script: str, args: list[str], log_path: Path) -> Child:
    """A bench script as a child process, its output in `log_path`; it prints `assigned` once it has partitions."""
    return _child([python, str(ROOT / "bench" / script), *args], log_path, {"PYTHONUNBUFFERED": "1"})


def start_java(main_class: str, args: list[str], log_path: Path) -> Child:
    """A class of bench/java's jar in its own JVM (the JVM is the child, so its pid is the one measured)."""
    return _child(["java", *JVM_OPTIONS, "-cp", str(JAR), f"fraudbench.{main_class}", *args], log_path)


def start_streams(bootstrap: str, group: str, source: str, target: str, mode: str, logs: Path, tag: str,
                  warmup: list[str]) -> Child:
    """The Kafka Streams scorer (`batched` or `per-record`) with the default manifest."""
    return start_java("StreamsScorer", [bootstrap, group, source, target, mode, str(MANIFEST), str(ROOT / "schemas"),
                                        str(logs / f"{tag}-state"), *warmup], logs / f"{tag}.log")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_mib(pid: int, key: str) -> float:
    """A memory line (VmRSS, VmHWM) of /proc/<pid>/status in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def create_topics(conf: dict, names: list[str], partitions: int, log_append: bool = False) -> None:
    """Create topics; with `log_append` the broker stamps each record's timestamp when it appends it."""
    config = {"message.timestamp.type": "LogAppendTime"} if log_append else {}
    client = admin(conf)  # kept alive until the futures resolve
    futures = client.create_topics([NewTopic(n, partitions, 1, config=config) for n in names], operation_timeout=30)
    for future in futures.values():
        future.result()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # a new partition answers "not leader" until its leader is known
        topics = client.list_topics(timeout=10).topics
        if all(n in topics and all(p.leader >= 0 for p in topics[n].partitions.values()) for n in names):
            return
        time.sleep(0.1)


class Probe:
    """One consumer kept open, never assigned, to read watermarks cheaply."""

    def __init__(self, conf: dict, broker_pid: int | None = None):
        self.conf = conf
        self.broker_pid = broker_pid  # the broker's CPU is counted beside each contender's
        self.consumer = Consumer({**conf, "group.id": "bench-probe", "enable.auto.commit": False, "logger": QUIET_LOG})

    def ends(self, topic: str) -> dict[int, tuple[int, int]]:
        """(low, high) watermark of each partition."""
        parts = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
                for p in parts}

    def count(self, topics: list[str]) -> int:
        """Records in the given topics."""
        return sum(high - low for t in topics for low, high in self.ends(t).values())

    def span_ms(self, topic: str, transactional: bool = False) -> tuple[int, int, int]:
        """First and last record timestamp of a topic and the timestamp type (per partition, LogAppendTime is
        monotonic)."""
        # A separate consumer: the broker answers a connection's requests in order, so an assigned consumer's
        # long-polling fetches would delay the watermark requests behind them.
        # A short fetch wait: a reassigned consumer's next fetch waits behind the long poll at the previous end.
        reader = Consumer({**self.conf, "group.id": "bench-span", "enable.auto.commit": False, "fetch.wait.max.ms": 10,
                           "logger": QUIET_LOG})
        firsts, lasts, kinds = [], [], set()
        try:
            for p, (low, high) in self.ends(topic).items():
                if high > low:
                    # A transactional topic ends with a commit marker, which no consumer sees: its last record is
                    # the one before it.
                    for offset, into in ((low, firsts), (max(low, high - 64), lasts)):
                        kind, ts = _record_at(reader, topic, p, offset, last=into is lasts,
                                              end=high - 1 - transactional).timestamp()
                        into.append(ts)
                        kinds.add(kind)
        finally:
            reader.close()
        return min(firsts), max(lasts), kinds.pop() if len(kinds) == 1 else -1

    def close(self) -> None:
        """Close the consumer."""
        self.consumer.close()


def _record_at(consumer: Consumer, topic: str, partition: int, offset: int, last: bool = False, end: int = 0):
    """The first record at or after `offset`; with `last`, the last record there is: the one at or after `end`, else
    the last before the partition is idle for a second."""
    consumer.assign([TopicPartition(topic, partition, offset)])
    deadline, found = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        # consume(n, t) waits for n records or t: take what has arrived, else wait for one.
        msgs = [m for m in consumer.consume(1000, 0) or consumer.consume(1, 1.0) if m.error() is None]
        if msgs and not last:
            return msgs[0]
        if not msgs and found is not None:
            return found
        found = msgs[-1] if msgs else found
        if found is not None and found.offset() >= end:
            return found
    if found is not None:
        return found
    raise RuntimeError(f"no record at {topic}[{partition}]@{offset}")


def warm_up(conf: dict, topic: str) -> None:
    """Load a fresh broker's coordinators (producer ids, transactions, groups) before the first contender needs them.

    A worker that met a broker still loading them was seen to leave a partition's offset uncommitted for good.
    """
    producer = Producer({**conf, "transactional.id": f"{topic}-txn", "logger": QUIET_LOG})
    producer.init_transactions(60)
    producer.begin_transaction()
    producer.produce(topic, b"warm-up")
    producer.commit_transaction(60)
    consumer = Consumer({**conf, "group.id": f"{topic}-group", "enable.auto.commit": False, "logger": QUIET_LOG})
    try:
        consumer.commit(offsets=[TopicPartition(topic, 0, 1)], asynchronous=False)
    finally:
        consumer.close()


def prefill(conf: dict, topic: str, count: int, gate: str | None = None) -> tuple[dict, Callable[[], None]]:
    """Produce `count` Avro transactions as fast as possible (linger 20 ms, lz4); return the timing and an opener.

    With `gate` (a transactional id) every record is written inside one transaction that is left open: a
    read_committed consumer (the worker) sees none of them until the opener commits it. Otherwise the opener does
    nothing.
    """
    codec = Codec()
    gated = {"transactional.id": gate, "transaction.timeout.ms": 600_000} if gate else {}
    producer = Producer({**conf, "linger.ms": 20, "compression.type": "lz4", "queue.buffering.max.messages": 1_000_000,
                         "logger": QUIET_LOG, **gated})
    if gate:
        producer.init_transactions(30)
        producer.begin_transaction()
    t0 = time.monotonic()
    now_ms = int(time.time() * 1000)
    for i, txn in enumerate(traffic.generated(count, prefix="bench")):
        value = codec.encode_transaction(traffic.stamp(txn, now_ms))
        send(producer, topic, value, txn.card_id.encode())
        if i % 1000 == 0:
            producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("pre-fill: not every transaction was acknowledged")
    seconds = time.monotonic() - t0
    return ({"messages": count, "seconds": round(seconds, 2), "rate_tps": round(count / seconds)},
            (lambda: producer.commit_transaction(60)) if gate else (lambda: None))


def drain(conf: dict, probe: Probe, children: list[Child], source: str, group: str, outs: list[str], expected: int,
          on_ready: Callable[[int], None] | None = None, transactional: bool = False,
          release: Callable[[], None] | None = None) -> dict:
    """Watch children drain `source` into `outs`; return throughput, CPU per transaction, RSS and their exit codes.

    `transactional`: outputs count once committed, which the group's committed offsets say (the output topics' end
    offsets also count commit markers and aborted records). Several children (replicas of one group): CPU and memory
    are their sums, from the moment every one of them owns partitions. `release`, if given, is called then: it makes
    the gated input visible (see prefill).
    """
    pids, t0 = [c.proc.pid for c in children], time.monotonic()
    load = os.getloadavg()[0]
    try:
        parts = set(probe.ends(source))

        def balanced() -> bool:
            """One child that owns partitions, or replicas that each own some and together all, none twice."""
            if len(children) == 1:
                return children[0].ready()
            owned = [c.owned() for c in children]
            return all(owned) and sum(map(len, owned)) == len(parts) and set().union(*owned) == parts

        while not balanced():
            if any(c.proc.poll() is not None for c in children) or time.monotonic() - t0 > 120:
                names = ", ".join(str(c.log_path) for c in children)
                raise RuntimeError(f"{children[0].log_path.stem} did not get partitions; see {names}")
            time.sleep(0.01)
        owned = [sorted(c.owned()) for c in children if c.owned and len(children) > 1]
        cpu0, t_ready = sum(map(cpu_seconds, pids)), time.monotonic()
        broker0 = cpu_seconds(probe.broker_pid) if probe.broker_pid else None
        if release:
            release()
        balanced_s = t_ready - t0
        if on_ready:
            on_ready(pids[0])
        rss, next_sample, seen, progress = [], t_ready, 0, t_ready
        while seen < expected:
            now = time.monotonic()
            if now >= next_sample:
                rss.append(round(sum(status_mib(pid, "VmRSS") for pid in pids), 1))
                next_sample += 1.0
            count = sum(max(0, o) for o in committed_offsets(conf, group, source).values()) if transactional \
                else probe.count(outs)
            if count > seen:
                seen, progress = count, now
            if any(c.proc.poll() is not None for c in children) or now - progress > 120:
                raise RuntimeError(f"{children[0].log_path.stem} stalled at {seen:,}/{expected:,} outputs; "
                                   f"see {children[0].log_path}")
            time.sleep(0.1)
        cpu1, t_done = sum(map(cpu_seconds, pids)), time.monotonic()
        broker_cpu = cpu_seconds(probe.broker_pid) - broker0 if broker0 is not None else None
        hwm = [status_mib(pid, "VmHWM") for pid in pids]
        # A gated input ends with the commit marker of its transaction, an offset no consumer sees nor commits.
        slack = 1 if release else 0
        ends = {p: high - slack for p, (_, high) in probe.ends(source).items()}
        while any(committed_offsets(conf, group, source).get(p, -1) < high for p, high in ends.items() if high > 0):
            if time.monotonic() - t_done > 60:
                raise RuntimeError(f"{children[0].log_path.stem}: offsets not all committed 60 s after the last output")
            time.sleep(0.25)
        committed_after = time.monotonic() - t_done
    finally:
        t_stop = time.monotonic()
        codes = [c.stop() for c in children]
        stop_s = time.monotonic() - t_stop
    t_span = time.monotonic()
    first, last, ts_type = probe.span_ms(outs[0], transactional)
    span_read_s = time.monotonic() - t_span
    outputs = expected if transactional else probe.count(outs)
    span_s = max((last - first) / 1000, 1e-3)
    result = {"throughput_tps": round((outputs - 1) / span_s), "drain_s": round(span_s, 3), "outputs": outputs}
    if len(children) > 1:
        result.update(balanced_after_s=round(balanced_s, 2), owned_partitions=owned)
    return {
        **result,
        "dead_letters": probe.count(outs[1:]) if len(outs) > 1 else 0,
        "timestamp_type": {1: "CreateTime", 2: "LogAppendTime"}.get(ts_type, str(ts_type)),
        "ready_to_last_output_s": round(t_done - t_ready, 2),
        "all_committed_after_s": round(committed_after, 2),
        "harness_s": {"start_to_assigned": round(t_ready - t0, 2), "stop": round(stop_s, 2),
                      "read_span": round(span_read_s, 2)},
        "cpu_s": round(cpu1 - cpu0, 2),
        "startup_cpu_s": round(cpu0, 2),
        "cpu_us_per_txn": round((cpu1 - cpu0) / expected * 1e6, 1),
        **({} if broker_cpu is None else {
            "broker_cpu_us_per_txn": round(broker_cpu / expected * 1e6, 1),
            # Cores kept busy by the contender and the broker together, from assignment to the last output.
            "cores_busy": round((cpu1 - cpu0 + broker_cpu) / max(t_done - t_ready, 1e-3), 2)}),
        "peak_rss_mib": round(sum(hwm), 1),
        **({"peak_rss_mib_each": hwm} if len(hwm) > 1 else {}),
        "rss_mib_per_s": rss,
        "exit_code": max(codes, key=abs),
        **({"exit_codes": codes} if len(codes) > 1 else {}),
        "loadavg_1m_at_start": round(load, 2),
    }


def run_contender(name: str, conf: dict, probe: Probe, run_id: str, source: str, partitions: int, expected: int,
                  logs: Path, quix_python: str | None, suffix: str = "", on_ready=None,
                  jvm_warmup: list[str] = ()) -> dict:
    """Fresh group and output topics for one contender, start it, and measure its drain.

    `jvm_warmup`: the warm-up source, target and record count that a Java contender handles before it joins.
    """
    tag, t0 = f"{run_id}-{name.replace('_', '-')}{suffix}", time.monotonic()
    outs = [f"{tag}-out"] if name in COPIES or name in STREAMS else [f"{tag}-out", f"{tag}-dlq"]
    create_topics(conf, outs, partitions, log_append=True)
    bootstrap = conf["bootstrap.servers"]
    overrides = dict(WORKERS.get(name, {}))
    if "challenger_manifest" in overrides:
        overrides["shadow_topic"] = f"{tag}-shadow"
        create_topics(conf, [overrides["shadow_topic"]], partitions, log_append=True)
    release = None
    if name == "worker_x2":
        # Replicas join one after another, and the first would drain alone until the group rebalanced. So they drain
        # a copy of the input written in one open transaction, committed once both own partitions.
        source = f"{tag}-in"
        create_topics(conf, [source], partitions)
        _, release = prefill(conf, source, expected, gate=f"{tag}-gate")
        children = [start_worker(bootstrap, f"{tag}-{i}", source, outs, logs, group=outs[0]) for i in "ab"]
    elif name in WORKERS:
        children = [start_worker(bootstrap, tag, source, outs, logs, **overrides)]
    elif name == "ceiling":
        children = [start_script(sys.executable, "ceiling.py", [bootstrap, outs[0], source, outs[0]],
                                 logs / f"{tag}.log")]
    elif name == "java_copy":
        children = [start_java("Copy", [bootstrap, outs[0], source, outs[0], *jvm_warmup], logs / f"{tag}.log")]
    elif name in STREAMS:
        children = [start_streams(bootstrap, outs[0], source, outs[0], STREAMS[name], logs, tag, list(jvm_warmup))]
    else:
        children = [start_script(quix_python, "quix_peer.py", [bootstrap, outs[0], source, outs[0]],
                                 logs / f"{tag}.log")]
    print(f"  {name:18s}", end=" ", flush=True)
    result = drain(conf, probe, children, source, outs[0], outs, expected, on_ready,
                   transactional=WORKERS.get(name, {}).get("delivery") == "exactly_once", release=release)
    result["topic"], result["contender_wall_s"] = outs[0], round(time.monotonic() - t0, 1)
    if "shadow_topic" in overrides:
        result["shadow_verdicts"] = probe.count([overrides["shadow_topic"]])
    print(f"{result['throughput_tps']:>9,} txn/s  {result['cpu_us_per_txn']:>7} µs/txn  "
          f"peak RSS {result['peak_rss_mib']} MiB  (exit {result['exit_code']})", flush=True)
    return result


def produce_at_rate(bootstrap: str, topic: str, rate: float, count: int, prefix: str, report) -> None:
    """Child process: open-loop traffic at `rate`/s; each transaction carries its scheduled send time as event_time."""
    codec = Codec()
    txns = list(traffic.generated(count, seed=1, prefix=prefix))
    t0 = time.perf_counter()
    for txn in txns[:2000]:
        codec.encode_transaction(txn)
    # Encoding everything before the clock starts keeps the sender cheap enough to hold the rate on a busy machine.
    start = time.time() + 1.0 + 2.0 * (time.perf_counter() - t0) * count / min(count, 2000)
    values = [codec.encode_transaction(traffic.stamp(txn, int((start + i / rate) * 1000)))
              for i, txn in enumerate(txns)]
    producer = plain_producer({"bootstrap.servers": bootstrap})
    lags = []
    for i, (txn, value) in enumerate(zip(txns, values)):
        if i % 10 == 0:
            ahead = start + i / rate - time.time()
            if ahead > 0:
                time.sleep(ahead)
            lags.append(max(0.0, -ahead) * 1000)
        send(producer, topic, value, txn.card_id.encode())
        producer.poll(0)
    producer.flush(60)
    lags.sort()
    report.put({"sender_lag_p99_ms": round(lags[int(len(lags) * 0.99)], 1), "sender_lag_max_ms": round(lags[-1], 1)})


def _long(buf: bytes, pos: int) -> tuple[int, int]:
    """An Avro long (zig-zag varint) at `pos`, and the position after it."""
    shift = result = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7


def _skip_string(buf: bytes, pos: int) -> int:
    """The position after the Avro string at `pos`."""
    length, pos = _long(buf, pos)
    return pos + length


def transaction_event_time(value: bytes) -> int:
    """event_time of a schemaless Transaction: after transaction_id, card_id and amount (schemas/transaction.avsc)."""
    return _long(value, _skip_string(value, _skip_string(value, 0)) + 8)[0]


def verdict_event_time(value: bytes) -> int:
    """event_time of a schemaless Verdict: after ids, probability, is_fraud, decision, thresholds, model name and
    version (schemas/verdict.avsc)."""
    pos = _skip_string(value, _skip_string(value, 0)) + 9
    pos = _long(value, pos)[1] + 16
    return _long(value, _skip_string(value, _skip_string(value, pos)))[0]


def transaction_id(value: bytes) -> bytes:
    """The first field, transaction_id, of a schemaless Transaction or Verdict, as UTF-8 bytes."""
    length, pos = _long(value, 0)
    return value[pos:pos + length]


def latency(conf: dict, run_id: str, partitions: int, max_tps: float, fractions: list[float], seconds: float,
            logs: Path, contender: str = "worker") -> list[dict]:
    """End-to-end latency of a contender (a worker variant or java_copy) at fixed fractions of the worker's drain
    throughput, after a warm-up.

    The reader is read_committed (librdkafka's default), as downstream of exactly-once must be.
    """
    tag = f"{run_id}-latency-{contender.replace('_', '-')}"
    source, outs = f"{tag}-in", [f"{tag}-out"] if contender == "java_copy" else [f"{tag}-out", f"{tag}-dlq"]
    create_topics(conf, [source, *outs], partitions)
    if contender == "java_copy":
        child, event_time = start_java("Copy", [conf["bootstrap.servers"], outs[0], source, outs[0]],
                                       logs / f"{tag}.log"), transaction_event_time
    else:
        child, event_time = start_worker(conf["bootstrap.servers"], tag, source, outs, logs, **WORKERS[contender]), \
            verdict_event_time
    reader = Consumer({**conf, "group.id": f"{tag}-reader", "auto.offset.reset": "earliest", "logger": QUIET_LOG})
    reader.subscribe([outs[0]])
    rows = []
    try:
        deadline = time.monotonic() + 120
        while not (child.ready() and reader.assignment()):
            reader.consume(1, 0.1)
            if time.monotonic() > deadline or child.proc.poll() is not None:
                raise RuntimeError(f"latency contender or reader did not get partitions; see {child.log_path}")
        # The first seconds of a fresh contender and reader (connections, producer id, first fetches) are not its
        # latency; nor is the JVM's compilation of its hot code, which takes longer.
        warmup = min(JVM_WARMUP_S if contender == "java_copy" else 3.0, seconds)
        _phase(conf, reader, source, fractions[0] * max_tps, warmup, "warmup", event_time)
        for fraction in fractions:
            row = _phase(conf, reader, source, fraction * max_tps, seconds, f"lat{round(fraction * 100)}", event_time)
            rows.append({"contender": contender, "fraction": fraction, **row})
            print(f"  {contender:19s} {fraction:>4.0%} of max = {row['offered_tps']:>8,} txn/s offered: "
                  f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, p99.9 {row['p99_9_ms']} ms, "
                  f"max {row['max_ms']} ms, "
                  f"sender lag p99 {row['sender_lag_p99_ms']} ms", flush=True)
    finally:
        reader.close()
        child.stop()
    return rows


def _phase(conf: dict, reader: Consumer, source: str, rate: float, seconds: float, prefix: str,
           event_time: Callable[[bytes], int]) -> dict:
    """Send `rate`/s for `seconds` from a child process and read the outputs; return latency percentiles and rates.

    Every output's latency goes into an HdrHistogram in microseconds (3 significant digits); the values are kept
    with their arrival time and decoded once the phase is over, so that the reader costs little while it runs.
    """
    from hdrh.histogram import HdrHistogram

    count = int(rate * seconds)
    ctx = multiprocessing.get_context("spawn")
    report = ctx.Queue()
    sender = ctx.Process(target=produce_at_rate, args=(conf["bootstrap.servers"], source, rate, count, prefix, report))
    sender.start()
    arrivals, received, first, last = [], 0, None, None
    deadline = time.monotonic() + seconds + 120
    while received < count and time.monotonic() < deadline:
        # consume(n, t) waits for n records or t; take what has arrived, else block for one.
        msgs = reader.consume(1000, 0) or reader.consume(1, 0.1)
        arrived = time.time() * 1000
        values = [m.value() for m in msgs if m.error() is None]
        if values:
            received += len(values)
            first, last = first or arrived, arrived
            arrivals.append((arrived, values))
    sender_report = report.get(timeout=60)
    sender.join(60)
    if not received:
        raise RuntimeError(f"no output arrived at {rate:,.0f} txn/s")
    hist = HdrHistogram(1, 3_600_000_000, 3)
    counts = Counter(max(0, round((arrived - event_time(value)) * 1000)) for arrived, values in arrivals
                     for value in values)
    for micros, n in counts.items():
        hist.record_value(micros, n)
    ms = lambda us: round(us / 1000, 2)  # noqa: E731
    span = (last - first) / 1000
    return {"offered_tps": round(rate), "seconds": seconds, "verdicts": received, "expected": count,
            "latency_samples": hist.get_total_count(),
            "verdict_rate_tps": round(received / span) if span > 0 else None, **sender_report,
            **{f"p{str(q).replace('.', '_')}_ms": ms(hist.get_value_at_percentile(q)) for q in (50, 95, 99, 99.9)},
            "max_ms": ms(hist.get_max_value())}


def accuracy(conf: dict, worker_topic: str, streams_topic: str, sample: int) -> dict:
    """Compare up to `sample` verdicts of a Streams contender with the worker's verdicts for the same ids."""
    codec = Codec()
    theirs = {transaction_id(m.value()): codec.decode_verdict(m.value())
              for m in _read_topic(conf, streams_topic, per_partition=-(-sample // 6))}
    theirs = dict(list(theirs.items())[:sample])
    ours = {}
    for m in _read_topic(conf, worker_topic):
        tid = transaction_id(m.value())
        if tid in theirs and tid not in ours:
            ours[tid] = codec.decode_verdict(m.value())
    pairs = [(ours[t], theirs[t]) for t in theirs if t in ours]
    diffs = [abs(o["fraud_probability"] - s["fraud_probability"]) for o, s in pairs]
    mismatched = [(o, s) for o, s in pairs if o["decision"] != s["decision"]]
    beyond = [(o, s) for o, s in mismatched
              if min(abs(o["fraud_probability"] - t) for t in (o["review_threshold"], o["decline_threshold"])) > NOISE]
    return {"sampled": len(theirs), "matched": len(pairs), "max_abs_probability_diff": max(diffs, default=None),
            "decision_mismatches": len(mismatched), "mismatches_beyond_noise": len(beyond),
            "examples": [{"worker": o, "streams": s} for o, s in mismatched[:5]]}


def _read_topic(conf: dict, topic: str, per_partition: int | None = None):
    """The records of a topic from its start, or the first `per_partition` of each partition."""
    reader = Consumer({**conf, "group.id": f"bench-read-{topic}", "enable.auto.commit": False, "fetch.wait.max.ms": 10,
                       "logger": QUIET_LOG})
    try:
        parts = reader.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: reader.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in parts}
        want = {p: high if per_partition is None else min(high, low + per_partition) for p, (low, high) in ends.items()}
        reader.assign([TopicPartition(topic, p, low) for p, (low, _) in ends.items() if want[p] > low])
        pos = {p: low for p, (low, _) in ends.items()}
        deadline = time.monotonic() + 120
        while any(pos[p] < want[p] for p in pos) and time.monotonic() < deadline:
            for m in reader.consume(10_000, 0) or reader.consume(1, 1.0):
                if m.error() is None:
                    pos[m.partition()] = m.offset() + 1
                    if m.offset() < want[m.partition()]:
                        yield m
    finally:
        reader.close()


def ensure_bench_extra() -> None:
    """Install pyproject's `bench` extra into this venv if one of its modules is missing."""
    if all(importlib.util.find_spec(m) for m in ("matplotlib", "hdrh")):
        return
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bench"]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *extra], check=True)


def ensure_quix_venv() -> dict:
    """Create bench/.venv-quix (Quix Streams pins an older confluent-kafka than ours) unless it is complete."""
    python, stamp = QUIX_VENV / "bin" / "python", QUIX_VENV / ".installed"
    t0 = time.monotonic()
    if not stamp.exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(QUIX_VENV)], check=True, capture_output=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", *QUIX_PACKAGES], check=True, capture_output=True,
                           text=True, timeout=900)
        except (subprocess.SubprocessError, OSError) as exc:
            tail = getattr(exc, "stderr", "") or str(exc)
            return {"python": None, "venv_seconds": round(time.monotonic() - t0, 1), "error": tail.strip()[-500:]}
        stamp.write_text(" ".join(QUIX_PACKAGES))
    return {"python": str(python), "venv_seconds": round(time.monotonic() - t0, 1), "error": None}


def ensure_java_jar() -> dict:
    """Build bench/java's fat jar with `mvn -q -B package` unless it is newer than the pom and every source."""
    sources = [JAVA_DIR / "pom.xml", *(p for p in (JAVA_DIR / "src").rglob("*") if p.is_file())]
    t0 = time.monotonic()
    JAR.parent.mkdir(exist_ok=True)
    with open(JAR.parent / ".build.lock", "w") as lock:  # concurrent bench runs build once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if JAR.exists() and JAR.stat().st_mtime >= max(p.stat().st_mtime for p in sources):
            return {"jar": str(JAR), "built": False, "build_seconds": 0}
        mvn = shutil.which("mvn")
        if mvn is None or shutil.which("javac") is None:
            raise RuntimeError("bench/java needs a JDK 17+ (javac) and Maven (mvn) on the PATH")
        done = subprocess.run([mvn, "-q", "-B", "package"], cwd=JAVA_DIR, capture_output=True, text=True, timeout=1200,
                              check=False)
        if done.returncode or not JAR.exists():
            raise RuntimeError(f"mvn package in {JAVA_DIR} failed:\n{done.stdout[-4000:]}{done.stderr[-4000:]}")
    return {"jar": str(JAR), "built": True, "build_seconds": round(time.monotonic() - t0, 1)}


def java_versions() -> dict:
    """The JVM and the versions bench/java/pom.xml pins."""
    pom = (JAVA_DIR / "pom.xml").read_text()
    pinned = dict(re.findall(r"<([a-z]+)\.version>([^<]+)<", pom))
    jvm = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False).stderr.splitlines()
    return {"jvm": jvm[0] if jvm else "?", "jvm_options": " ".join(JVM_OPTIONS), "kafka_clients": pinned.get("kafka"),
            "kafka_streams": pinned.get("kafka"), "avro": pinned.get("avro"), "onnxruntime": pinned.get("onnxruntime")}


def machine() -> dict:
    """CPU count and model, memory, kernel and load."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?")
    mem = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_model": model, "memory_gib": round(mem / 2**20, 1),
            "kernel": platform.release(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def versions(quix_python: str | None) -> dict:
    """Versions of Python, the libraries of both venvs and the broker."""
    import confluent_kafka
    import fastavro
    import numpy
    import onnxruntime

    ours = {"python": platform.python_version(), "confluent_kafka": confluent_kafka.__version__,
            "librdkafka": confluent_kafka.libversion()[0], "fastavro": fastavro.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__, "kafka_broker": KAFKA_VERSION,
            "java": java_versions()}
    if quix_python:
        code = ("import json, confluent_kafka, fastavro, onnxruntime, numpy, quixstreams; print(json.dumps({"
                "'quixstreams': quixstreams.__version__, 'confluent_kafka': confluent_kafka.__version__, "
                "'librdkafka': confluent_kafka.libversion()[0], 'fastavro': fastavro.__version__, "
                "'onnxruntime': onnxruntime.__version__, 'numpy': numpy.__version__}))")
        ours["quix_venv"] = json.loads(subprocess.run([quix_python, "-c", code], capture_output=True, text=True,
                                                      check=True).stdout)
    return ours


def profile_worker(conf: dict, probe: Probe, run_id: str, source: str, partitions: int, expected: int, logs: Path,
                   out: Path) -> dict:
    """Drain once more with py-spy sampling the worker (100 Hz, non-blocking); return the top functions."""
    raw, spy = out / "profile.txt", []

    def attach(pid: int) -> None:
        spy.append(subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "-r", "100",
                                     "--nonblocking", "--function", "-f", "raw", "-o", str(raw)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    result = run_contender("worker_profiled", conf, probe, run_id, source, partitions, expected, logs, None,
                           on_ready=attach)
    spy[0].wait(30)  # py-spy writes its file when the worker exits
    if not raw.exists():
        return {"drain": result, "error": "py-spy wrote no profile (is ptrace allowed?)"}
    return {"drain": result, **top_functions(raw)}


def top_functions(raw: Path, n: int = 15) -> dict:
    """Self and inclusive share of py-spy's active samples per function, from its collapsed stacks."""
    own, incl, total = Counter(), Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, c = [f for f in stack.split(";") if f], int(count)
        if not frames:
            continue
        total += c
        own[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    share = lambda counter: [[f, round(100 * c / total, 1)] for f, c in counter.most_common(n)]  # noqa: E731
    return {"samples": total, "self_pct": share(own), "inclusive_pct": share(incl), "collapsed_stacks": str(raw)}


def summarise(rounds: list[dict]) -> tuple[dict, dict]:
    """Median per contender over rounds, and the worker's throughput ratios per round and their median (plus
    worker_x2 against one worker and against the Java copy)."""
    contenders = {}
    for name in rounds[0]:
        runs = [r[name] for r in rounds]
        contenders[name] = {"throughput_tps": round(statistics.median(r["throughput_tps"] for r in runs)),
                            "cpu_us_per_txn": round(statistics.median(r["cpu_us_per_txn"] for r in runs), 1),
                            **{k: round(statistics.median(r[k] for r in runs), 2)
                               for k in ("broker_cpu_us_per_txn", "cores_busy") if k in runs[0]},
                            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "rounds": runs}
    per_round = []
    for r in rounds:
        ratios = {f"worker/{n}": round(r["worker"]["throughput_tps"] / r[n]["throughput_tps"], 3)
                  for n in r if n != "worker"}
        for n in ("worker", "java_copy"):
            if "worker_x2" in r and n in r:
                ratios[f"worker_x2/{n}"] = round(r["worker_x2"]["throughput_tps"] / r[n]["throughput_tps"], 3)
        per_round.append(ratios)
    ratios = {k: round(statistics.median(p[k] for p in per_round), 3) for k in per_round[0]}
    return contenders, {**ratios, "per_round": per_round}


def markdown(res: dict) -> str:
    """The README tables: contenders, then latency."""
    c, m = res["contenders"], res["machine"]
    lines = [(f"Drain of {res['messages']:,} transactions, {res['partitions']} partitions, one contender at a time, "
              f"medians of {res['rounds']} round(s) (peak RSS: the highest); {m['nproc']} cores ({m['cpu_model']}), "
              f"Kafka {res['versions']['kafka_broker']} on the same machine."), "",
             ("| contender | what | throughput (txn/s) | worker ÷ contender | CPU µs/txn | broker CPU µs/txn | "
              "cores busy (contender + broker) | peak RSS (MiB) | RSS (MiB): at assignment → range from 1 s on |"),
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in c.items():
        rss = r["rounds"][0]["rss_mib_per_s"]
        steady = f"{min(rss[1:])}–{max(rss[1:])}" if len(rss) > 1 else "–"
        ratio = "1" if name == "worker" else f"{res['ratios'][f'worker/{name}']:.2f}×"
        lines.append(f"| {name} | {WHAT.get(name, '')} | {r['throughput_tps']:,} | {ratio} | {r['cpu_us_per_txn']} | "
                     f"{r.get('broker_cpu_us_per_txn', '–')} | {r.get('cores_busy', '–')} | "
                     f"{r['peak_rss_mib']} | {rss[0] if rss else '–'} → {steady} |")
    notes = []
    if res.get("peer_skipped"):
        notes.append(f"Quix peer skipped: {res['peer_skipped']}.")
    ratios = res["ratios"]
    if "worker_x2/worker" in ratios:
        notes.append(f"worker_x2: {ratios['worker_x2/worker']:.2f}× one worker's throughput"
                     + (f", {ratios['worker_x2/java_copy']:.2f}× the Java copy's." if "worker_x2/java_copy" in ratios
                        else "."))
    for name, acc in res.get("accuracy", {}).items():
        diff = acc["max_abs_probability_diff"]
        notes.append(f"{name} against the worker on {acc['matched']:,} sampled transaction ids: max |probability "
                     f"difference| {'–' if diff is None else f'{diff:.3g}'}, {acc['decision_mismatches']} decision "
                     f"mismatch(es) ({acc['mismatches_beyond_noise']} not explained by float noise).")
    if len(ratios["per_round"]) > 1:
        notes.append("Ratios per round: " + "; ".join(", ".join(f"{k} {v}" for k, v in p.items())
                                                      for p in ratios["per_round"]))
    lines += ["", *(f"- {n}" for n in notes)] if notes else []
    lines += ["", ("| contender | offered (txn/s) | % of worker max | outputs received (txn/s) | outputs | p50 (ms) | "
                   "p95 (ms) | p99 (ms) | p99.9 (ms) | max (ms) | sender lag p99 (ms) |"),
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["latency"]:
        lines.append(f"| {r['contender']} | {r['offered_tps']:,} | {r['fraction']:.0%} | "
                     f"{r['verdict_rate_tps'] or 0:,} | {r['verdicts']:,} | {r['p50_ms']} | {r['p95_ms']} | "
                     f"{r['p99_ms']} | {r['p99_9_ms']} | {r['max_ms']} | {r['sender_lag_p99_ms']} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    """Throughput bars per contender and latency percentiles per contender and offered rate."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(15, 5.5))
    names = list(res["contenders"])
    tps = [res["contenders"][n]["throughput_tps"] for n in names]
    palette = {"worker": "#2b6cb0", "java": "#dd8452", "streams": "#55a868", "ceiling": "#888888", "quix": "#8172b3"}
    colors = [next((v for k, v in palette.items() if n.startswith(k) or k in n), "#4a90d9") for n in names]
    bars = a.bar(names, tps, color=colors)
    a.bar_label(bars, labels=[f"{t:,}" for t in tps], fontsize=7)
    a.set_ylabel("transactions / s (drain)")
    a.tick_params(axis="x", labelrotation=40, labelsize=8)
    a.set_title(f"Drain of {res['messages']:,} transactions, one contender at a time")
    qs = ["p50_ms", "p99_ms", "p99_9_ms", "max_ms"]
    width = 0.8 / len(qs)
    for i, q in enumerate(qs):
        xs = [j + i * width for j in range(len(res["latency"]))]
        b.bar(xs, [max(r[q], 0.01) for r in res["latency"]], width, label=q.removesuffix("_ms").replace("_", "."))
    short = {"worker": "worker", "java_copy": "Java copy", "worker_exactly_once": "worker EOS"}
    b.set_xticks([j + 0.4 - width / 2 for j in range(len(res["latency"]))],
                 [f"{short.get(r['contender'], r['contender'])}\n{r['offered_tps']:,}/s ({r['fraction']:.0%})"
                  for r in res["latency"]], fontsize=7)
    b.set_yscale("log")
    b.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    b.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    b.set_ylabel("end-to-end latency (ms)")
    b.set_title("Latency at fixed offered rates (fractions of the worker's drain rate)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    """Parse the options, run the benchmark, write results.json, results.md and bench.png."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=500_000, help="transactions in the pre-filled topic")
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--rounds", type=int, default=1, help="drain every contender this many times (medians reported)")
    p.add_argument("--latency-seconds", type=float, default=20.0, help="duration of each latency rate")
    p.add_argument("--rates", default="0.25,0.5,0.75",
                   help="latency rates as fractions of the worker's drain throughput")
    p.add_argument("--no-peer", action="store_true", help="skip the Quix Streams peer")
    p.add_argument("--profile", action="store_true",
                   help="one more worker drain under py-spy; top functions in the results")
    p.add_argument("--smoke", action="store_true", help="3,000 transactions, one 3-second latency rate (for CI)")
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help="comma-separated subset to drain (the worker is always drained; for quick A/B runs)")
    p.add_argument("--no-latency", action="store_true", help="drains only, no latency phases")
    a = p.parse_args()
    chosen = {"worker", *a.contenders.split(",")}
    if not chosen <= set(CONTENDERS):
        p.error(f"unknown contender(s) {', '.join(sorted(chosen - set(CONTENDERS)))}; choose from {CONTENDERS}")
    if a.smoke:
        a.messages, a.latency_seconds, a.rates, a.rounds = 3_000, 3.0, "0.5", 1
    started = time.monotonic()
    out, logs = a.out.resolve(), a.out.resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ensure_bench_extra()
    print("bench/java: the Java contenders' jar ...", flush=True)
    java = ensure_java_jar()
    print(f"  {'built in ' + str(java['build_seconds']) + ' s' if java['built'] else 'up to date'}", flush=True)
    peer = {"python": None, "venv_seconds": 0, "error": "--no-peer"} if a.no_peer else ensure_quix_venv()
    res = {"mode": "smoke" if a.smoke else "full", "messages": a.messages, "partitions": a.partitions,
           "rounds": a.rounds, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "method": METHOD,
           "machine": machine(), "versions": versions(peer["python"]), "java_build": java,
           "peer_venv_seconds": peer["venv_seconds"], "peer_skipped": peer["error"]}
    broker = LocalBroker(port=PORT, home=CACHE / f"broker-bench-{PORT}")
    broker.home.mkdir(parents=True, exist_ok=True)
    users = open(broker.home / ".users", "w")
    # Concurrent bench runs share the broker; the last one to finish stops it.
    fcntl.flock(users, fcntl.LOCK_SH)
    conf = {"bootstrap.servers": broker.start()}
    run_id = f"bench-{time.strftime('%H%M%S')}-{os.getpid()}"
    probe = Probe(conf, broker.pid())
    try:
        source = f"{run_id}-tx"
        create_topics(conf, [source, f"{run_id}-warmup"], a.partitions)
        warm_up(conf, f"{run_id}-warmup")
        print(f"pre-filling {source} with {a.messages:,} transactions ...", flush=True)
        res["prefill"], _ = prefill(conf, source, a.messages)
        print(f"  {res['prefill']['rate_tps']:,} txn/s", flush=True)
        warm = [f"{run_id}-jvm-warmup", f"{run_id}-jvm-warmup-out", str(min(a.messages, JVM_WARMUP_RECORDS))]
        create_topics(conf, warm[:2], a.partitions)
        res["jvm_warmup"], _ = prefill(conf, warm[0], int(warm[2]))
        names = [n for n in CONTENDERS if n in chosen and (n != "quix_peer" or peer["python"])]
        rounds = []
        for i in range(a.rounds):
            print(f"round {i + 1}/{a.rounds}: drain of {a.messages:,} transactions", flush=True)
            rounds.append({n: run_contender(n, conf, probe, run_id, source, a.partitions, a.messages, logs,
                                            peer["python"], suffix=f"-r{i}", jvm_warmup=warm) for n in names})
        res["contenders"], res["ratios"] = summarise(rounds)
        print(f"accuracy: Kafka Streams verdicts against the worker's, {ACCURACY_SAMPLE} ids each", flush=True)
        res["accuracy"] = {n: accuracy(conf, rounds[0]["worker"]["topic"], rounds[0][n]["topic"], ACCURACY_SAMPLE)
                           for n in STREAMS if n in names}
        for n, acc in res["accuracy"].items():
            print(f"  {n:18s} {acc['matched']:,} matched, max |Δp| {acc['max_abs_probability_diff']}, "
                  f"{acc['decision_mismatches']} decision mismatch(es), {acc['mismatches_beyond_noise']} beyond noise",
                  flush=True)
        fractions = [] if a.no_latency else [float(f) for f in a.rates.split(",")]
        max_tps = res["contenders"]["worker"]["throughput_tps"]
        if a.smoke:  # a 3,000-transaction drain is one burst, not a maximum; keep the smoke run short
            max_tps = min(max_tps, 10_000)
        res["latency"] = []
        if fractions:
            print(f"latency at {', '.join(f'{f:.0%}' for f in fractions)} of {max_tps:,} txn/s, "
                  f"{a.latency_seconds:g} s each", flush=True)
            res["latency"] += latency(conf, run_id, a.partitions, max_tps, fractions, a.latency_seconds, logs)
            res["latency"] += latency(conf, run_id, a.partitions, max_tps, fractions, a.latency_seconds, logs,
                                      "java_copy")
            half = min(fractions, key=lambda f: abs(f - 0.5))
            res["latency"] += latency(conf, run_id, a.partitions, max_tps, [half], a.latency_seconds, logs,
                                      "worker_exactly_once")
        if a.profile:
            print("profile: one more worker drain under py-spy", flush=True)
            res["profile"] = profile_worker(conf, probe, run_id, source, a.partitions, a.messages, logs, out)
    finally:
        probe.close()
        client = admin(conf)
        topics = [t for t in client.list_topics(timeout=10).topics if t.startswith(run_id)]
        for future in (client.delete_topics(topics, operation_timeout=30) if topics else {}).values():
            future.result()
        try:
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            broker.stop()
        except BlockingIOError:
            pass
        users.close()
    res["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    res["duration_s"] = round(time.monotonic() - started, 1)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    table = markdown(res)
    (out / "results.md").write_text(table)
    plot(res, out / "bench.png")
    print("\n" + table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'bench.png'} in {res['duration_s']:.0f} s")
    wrong = {n: acc for n, acc in res["accuracy"].items() if acc["mismatches_beyond_noise"] or not acc["matched"]}
    if wrong:
        sys.exit(f"FAIL: the Kafka Streams scorer disagrees with the worker (or nothing matched): "
                 f"{json.dumps(wrong)[:2000]}")


if __name__ == "__main__":
    main()
