"""Benchmark: drain one pre-filled topic with the worker, a raw-copy ceiling, per-message scoring and a Quix Streams peer.

    .venv/bin/python bench/run.py [--messages 500000] [--partitions 6] [--out bench/results]

It starts its own broker on 127.0.0.1:59092, fills a topic with M Avro transactions, then drains it with each
contender in turn (fresh group, fresh output topics, a child process each), then measures the worker's end-to-end
latency at 25/50/75 % of its drain throughput. It writes results.json, results.md and bench.png to --out.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import multiprocessing
import os
import platform
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
CONTENDERS = ("worker", "worker_exactly_once", "worker_challenger", "ceiling", "worker_batch1", "quix_peer")
# Worker contenders: their settings beyond the defaults. The challenger (the reference MLP beside the default trees)
# also writes its verdicts to a shadow topic of its own.
WORKERS = {"worker": {}, "worker_profiled": {}, "worker_batch1": {"batch_max_size": 1},
           "worker_exactly_once": {"delivery": "exactly_once"},
           "worker_challenger": {"challenger_manifest": ROOT / "models" / "reference-fraud-mlp.json"}}
SAMPLE_EVERY = 10
METHOD = {
    "throughput": "outputs / (last - first output broker timestamp); output topics use LogAppendTime; exactly-once: "
                  "committed outputs (read_committed), progress followed by the group's committed offsets",
    "cpu": "utime+stime of the child (all threads) from /proc/<pid>/stat when the last output is on the broker, "
           "minus the same at the moment the child reported its partition assignment (start-up excluded)",
    "rss": "VmHWM from /proc/<pid>/status at the end; VmRSS sampled every second from assignment to the last output",
    "latency": "verdict arrival at a consumer (time.time()) minus the verdict's event_time, which an open-loop "
               "sender sets to the transaction's scheduled send time (so sender lag counts as latency); sender, "
               "reader, worker and broker share the machine's cores; percentiles and max are over every 10th verdict; "
               "a 3 s warm-up at the lowest rate precedes the measured rates",
}


@dataclass
class Child:
    """A contender's process: it has partitions once `marker` appears in its log; `stop` ends it and returns its code."""

    proc: subprocess.Popen
    log_path: Path
    marker: str
    stop: Callable[[], int]

    def ready(self) -> bool:
        """Whether the process has logged its partition assignment."""
        return self.log_path.exists() and self.marker in self.log_path.read_text(errors="replace")


def start_worker(bootstrap: str, name: str, source: str, outs: list[str], logs: Path, **overrides) -> Child:
    """The worker as `python -m worker run` (worker.tools.replica.Replica) with default settings plus `overrides`."""
    s = Settings(bootstrap_servers=bootstrap, group_id=outs[0], input_topic=source, verdict_topic=outs[0],
                 dead_letter_topic=outs[1], worker_id=name, metrics_port=0, **overrides)
    replica = Replica(s, logs / f"{name}.log")
    return Child(replica.proc, replica.log_path, "partitions_assigned", lambda: replica.terminate(120))


def start_script(python: str, script: str, args: list[str], log_path: Path) -> Child:
    """A bench script as a child process, its output in `log_path`; it prints `assigned` once it has partitions."""
    out = open(log_path, "ab")
    proc = subprocess.Popen([python, str(ROOT / "bench" / script), *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})

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
    for future in client.create_topics([NewTopic(n, partitions, 1, config=config) for n in names], operation_timeout=30).values():
        future.result()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # a new partition answers "not leader" until its leader is known
        topics = client.list_topics(timeout=10).topics
        if all(n in topics and all(p.leader >= 0 for p in topics[n].partitions.values()) for n in names):
            return
        time.sleep(0.1)


class Probe:
    """One consumer kept open, never assigned, to read watermarks cheaply."""

    def __init__(self, conf: dict):
        self.conf = conf
        self.consumer = Consumer({**conf, "group.id": "bench-probe", "enable.auto.commit": False, "logger": QUIET_LOG})

    def ends(self, topic: str) -> dict[int, tuple[int, int]]:
        """(low, high) watermark of each partition."""
        parts = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False) for p in parts}

    def count(self, topics: list[str]) -> int:
        """Records in the given topics."""
        return sum(high - low for t in topics for low, high in self.ends(t).values())

    def span_ms(self, topic: str) -> tuple[int, int, int]:
        """First and last record timestamp of a topic and the timestamp type (per partition, LogAppendTime is monotonic)."""
        # A separate consumer: the broker answers a connection's requests in order, so an assigned consumer's
        # long-polling fetches would delay the watermark requests behind them.
        reader = Consumer({**self.conf, "group.id": "bench-span", "enable.auto.commit": False, "logger": QUIET_LOG})
        firsts, lasts, kinds = [], [], set()
        try:
            for p, (low, high) in self.ends(topic).items():
                if high > low:
                    # A transactional topic ends with commit markers, which no consumer sees: read the last records.
                    for offset, into in ((low, firsts), (max(low, high - 64), lasts)):
                        kind, ts = _record_at(reader, topic, p, offset, last=into is lasts).timestamp()
                        into.append(ts)
                        kinds.add(kind)
        finally:
            reader.close()
        return min(firsts), max(lasts), kinds.pop() if len(kinds) == 1 else -1

    def close(self) -> None:
        """Close the consumer."""
        self.consumer.close()


def _record_at(consumer: Consumer, topic: str, partition: int, offset: int, last: bool = False):
    """The first record at or after `offset`; with `last`, the last record there is (idle for a second)."""
    consumer.assign([TopicPartition(topic, partition, offset)])
    deadline, found = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        msgs = [m for m in consumer.consume(1000, 1.0) if m.error() is None]
        if msgs and not last:
            return msgs[0]
        if not msgs and found is not None:
            return found
        found = msgs[-1] if msgs else found
    if found is not None:
        return found
    raise RuntimeError(f"no record at {topic}[{partition}]@{offset}")


def prefill(conf: dict, topic: str, count: int) -> dict:
    """Produce `count` Avro transactions as fast as possible (linger 20 ms, lz4); return the timing."""
    codec = Codec()
    producer = Producer({**conf, "linger.ms": 20, "compression.type": "lz4", "queue.buffering.max.messages": 1_000_000,
                         "logger": QUIET_LOG})
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
    return {"messages": count, "seconds": round(seconds, 2), "rate_tps": round(count / seconds)}


def drain(conf: dict, probe: Probe, child: Child, source: str, group: str, outs: list[str], expected: int,
          on_ready: Callable[[int], None] | None = None, transactional: bool = False) -> dict:
    """Watch a child drain `source` into `outs`; return throughput, CPU per transaction, RSS and its exit code.

    `transactional`: outputs count once committed, which the group's committed offsets say (the output topics' end
    offsets also count commit markers and aborted records).
    """
    pid, t0 = child.proc.pid, time.monotonic()
    load = os.getloadavg()[0]
    try:
        while not child.ready():
            if child.proc.poll() is not None or time.monotonic() - t0 > 120:
                raise RuntimeError(f"{child.log_path.stem} did not get partitions; see {child.log_path}")
            time.sleep(0.01)
        cpu0, t_ready = cpu_seconds(pid), time.monotonic()
        if on_ready:
            on_ready(pid)
        rss, next_sample, seen, progress = [], t_ready, 0, t_ready
        while seen < expected:
            now = time.monotonic()
            if now >= next_sample:
                rss.append(status_mib(pid, "VmRSS"))
                next_sample += 1.0
            count = sum(max(0, o) for o in committed_offsets(conf, group, source).values()) if transactional \
                else probe.count(outs)
            if count > seen:
                seen, progress = count, now
            if child.proc.poll() is not None or now - progress > 120:
                raise RuntimeError(f"{child.log_path.stem} stalled at {seen:,}/{expected:,} outputs; see {child.log_path}")
            time.sleep(0.1)
        cpu1, t_done = cpu_seconds(pid), time.monotonic()
        hwm = status_mib(pid, "VmHWM")
        ends = {p: high for p, (_, high) in probe.ends(source).items()}
        while any(committed_offsets(conf, group, source).get(p, -1) < high for p, high in ends.items() if high):
            if time.monotonic() - t_done > 60:
                raise RuntimeError(f"{child.log_path.stem}: offsets not all committed 60 s after the last output")
            time.sleep(0.25)
        committed_after = time.monotonic() - t_done
    finally:
        code = child.stop()
    first, last, ts_type = probe.span_ms(outs[0])
    outputs = expected if transactional else probe.count(outs)
    return {
        "throughput_tps": round((outputs - 1) / max((last - first) / 1000, 1e-3)),
        "drain_s": round((last - first) / 1000, 3),
        "outputs": outputs,
        "dead_letters": probe.count(outs[1:]) if len(outs) > 1 else 0,
        "timestamp_type": {1: "CreateTime", 2: "LogAppendTime"}.get(ts_type, str(ts_type)),
        "ready_to_last_output_s": round(t_done - t_ready, 2),
        "all_committed_after_s": round(committed_after, 2),
        "cpu_s": round(cpu1 - cpu0, 2),
        "startup_cpu_s": round(cpu0, 2),
        "cpu_us_per_txn": round((cpu1 - cpu0) / expected * 1e6, 1),
        "peak_rss_mib": hwm,
        "rss_mib_per_s": rss,
        "exit_code": code,
        "loadavg_1m_at_start": round(load, 2),
    }


def run_contender(name: str, conf: dict, probe: Probe, run_id: str, source: str, partitions: int, expected: int,
                  logs: Path, quix_python: str | None, suffix: str = "", on_ready=None) -> dict:
    """Fresh group and output topics for one contender, start it, and measure its drain."""
    tag = f"{run_id}-{name.replace('_', '-')}{suffix}"
    outs = [f"{tag}-out", f"{tag}-dlq"] if name != "ceiling" else [f"{tag}-out"]
    create_topics(conf, outs, partitions, log_append=True)
    bootstrap = conf["bootstrap.servers"]
    overrides = dict(WORKERS.get(name, {}))
    if "challenger_manifest" in overrides:
        overrides["shadow_topic"] = f"{tag}-shadow"
        create_topics(conf, [overrides["shadow_topic"]], partitions, log_append=True)
    if name in WORKERS:
        child = start_worker(bootstrap, tag, source, outs, logs, **overrides)
    elif name == "ceiling":
        child = start_script(sys.executable, "ceiling.py", [bootstrap, outs[0], source, outs[0]], logs / f"{tag}.log")
    else:
        child = start_script(quix_python, "quix_peer.py", [bootstrap, outs[0], source, outs[0]], logs / f"{tag}.log")
    print(f"  {name:14s}", end=" ", flush=True)
    result = drain(conf, probe, child, source, outs[0], outs, expected, on_ready,
                   transactional=WORKERS.get(name, {}).get("delivery") == "exactly_once")
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
    values = [codec.encode_transaction(traffic.stamp(txn, int((start + i / rate) * 1000))) for i, txn in enumerate(txns)]
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


def latency(conf: dict, run_id: str, partitions: int, max_tps: float, fractions: list[float], seconds: float,
            logs: Path, contender: str = "worker") -> list[dict]:
    """End-to-end latency of a worker contender at fixed fractions of the worker's drain throughput, after a warm-up.

    The reader is read_committed (librdkafka's default), as downstream of exactly-once must be.
    """
    tag = f"{run_id}-latency-{contender.replace('_', '-')}"
    source, outs = f"{tag}-in", [f"{tag}-out", f"{tag}-dlq"]
    create_topics(conf, [source, *outs], partitions)
    child = start_worker(conf["bootstrap.servers"], tag, source, outs, logs, **WORKERS[contender])
    reader = Consumer({**conf, "group.id": f"{tag}-reader", "auto.offset.reset": "earliest", "logger": QUIET_LOG})
    reader.subscribe([outs[0]])
    rows = []
    try:
        deadline = time.monotonic() + 120
        while not (child.ready() and reader.assignment()):
            reader.consume(1, 0.1)
            if time.monotonic() > deadline or child.proc.poll() is not None:
                raise RuntimeError(f"latency worker or reader did not get partitions; see {child.log_path}")
        # The first seconds of a fresh worker and reader (connections, producer id, first fetches) are not its latency.
        _phase(conf, reader, source, fractions[0] * max_tps, min(3.0, seconds), "warmup")
        for fraction in fractions:
            row = _phase(conf, reader, source, fraction * max_tps, seconds, f"lat{round(fraction * 100)}")
            rows.append({"contender": contender, "fraction": fraction, **row})
            print(f"  {fraction:>4.0%} of max = {row['offered_tps']:>8,} txn/s offered: p50 {row['p50_ms']} ms, "
                  f"p95 {row['p95_ms']} ms, p99 {row['p99_ms']} ms, max {row['max_ms']} ms, "
                  f"sender lag p99 {row['sender_lag_p99_ms']} ms", flush=True)
    finally:
        reader.close()
        child.stop()
    return rows


def _phase(conf: dict, reader: Consumer, source: str, rate: float, seconds: float, prefix: str) -> dict:
    """Send `rate`/s for `seconds` from a child process and read the verdicts; return latency percentiles and rates."""
    count = int(rate * seconds)
    ctx = multiprocessing.get_context("spawn")
    report = ctx.Queue()
    sender = ctx.Process(target=produce_at_rate, args=(conf["bootstrap.servers"], source, rate, count, prefix, report))
    sender.start()
    codec, lat, received, first, last = Codec(), [], 0, None, None
    deadline = time.monotonic() + seconds + 120
    while received < count and time.monotonic() < deadline:
        # consume(n, t) waits for n records or t; take what has arrived, else block for one.
        msgs = reader.consume(1000, 0) or reader.consume(1, 0.1)
        arrived = time.time() * 1000
        for m in msgs:
            if m.error() is None:
                received += 1
                first, last = first or arrived, arrived
                # Decoding every verdict would cost the reader a core at high rates; a sample is enough.
                if received % SAMPLE_EVERY == 0:
                    lat.append(arrived - codec.decode_verdict(m.value())["event_time"])
    sender_report = report.get(timeout=60)
    sender.join(60)
    if not lat:
        raise RuntimeError(f"no verdict arrived at {rate:,.0f} txn/s")
    lat.sort()
    span = (last - first) / 1000
    return {"offered_tps": round(rate), "seconds": seconds, "verdicts": received, "expected": count,
            "latency_samples": len(lat), "verdict_rate_tps": round(received / span) if span > 0 else None, **sender_report,
            **{f"p{q}_ms": round(lat[min(len(lat) - 1, int(len(lat) * q / 100))], 1) for q in (50, 95, 99)},
            "max_ms": round(lat[-1], 1)}


def ensure_bench_extra() -> None:
    """Install pyproject's `bench` extra into this venv if matplotlib is missing (`make setup` installs only `dev`)."""
    if importlib.util.find_spec("matplotlib"):
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
            "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__, "kafka_broker": KAFKA_VERSION}
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

    result = run_contender("worker_profiled", conf, probe, run_id, source, partitions, expected, logs, None, on_ready=attach)
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
    """Median per contender over rounds, and the worker's throughput ratios per round and their median."""
    contenders = {}
    for name in rounds[0]:
        runs = [r[name] for r in rounds]
        contenders[name] = {"throughput_tps": round(statistics.median(r["throughput_tps"] for r in runs)),
                            "cpu_us_per_txn": round(statistics.median(r["cpu_us_per_txn"] for r in runs), 1),
                            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "rounds": runs}
    per_round = [{f"worker/{n}": round(r["worker"]["throughput_tps"] / r[n]["throughput_tps"], 3)
                  for n in r if n != "worker"} for r in rounds]
    ratios = {k: round(statistics.median(p[k] for p in per_round), 3) for k in per_round[0]}
    return contenders, {**ratios, "per_round": per_round}


def markdown(res: dict) -> str:
    """The README tables: contenders, then latency."""
    c = res["contenders"]
    lines = [f"Drain of {res['messages']:,} transactions, {res['partitions']} partitions, one process each, "
             f"medians of {res['rounds']} round(s) (peak RSS: the highest); {res['machine']['nproc']} cores ({res['machine']['cpu_model']}), "
             f"Kafka {res['versions']['kafka_broker']} on the same machine.", "",
             "| contender | throughput (txn/s) | worker ÷ contender | CPU µs/txn | peak RSS (MiB) | RSS (MiB): at assignment → range from 1 s on |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in c.items():
        rss = r["rounds"][0]["rss_mib_per_s"]
        steady = f"{min(rss[1:])}–{max(rss[1:])}" if len(rss) > 1 else "–"
        ratio = "1" if name == "worker" else f"{res['ratios'][f'worker/{name}']:.2f}×"
        lines.append(f"| {name} | {r['throughput_tps']:,} | {ratio} | {r['cpu_us_per_txn']} | {r['peak_rss_mib']} | "
                     f"{rss[0]} → {steady} |")
    if res.get("peer_skipped"):
        lines.append(f"\nQuix peer skipped: {res['peer_skipped']}")
    if len(res["ratios"]["per_round"]) > 1:
        lines += ["", "Ratios per round: " + "; ".join(", ".join(f"{k} {v}" for k, v in p.items())
                                                        for p in res["ratios"]["per_round"])]
    lines += ["", "| contender | offered (txn/s) | % of worker max | verdicts received (txn/s) | verdicts | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) | sender lag p99 (ms) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["latency"]:
        lines.append(f"| {r['contender']} | {r['offered_tps']:,} | {r['fraction']:.0%} | {r['verdict_rate_tps'] or 0:,} | {r['verdicts']:,} | "
                     f"{r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['max_ms']} | {r['sender_lag_p99_ms']} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    """Throughput bars per contender and latency percentiles per offered rate."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(res["contenders"])
    tps = [res["contenders"][n]["throughput_tps"] for n in names]
    bars = a.bar(names, tps, color=["#2b6cb0", "#4a90d9", "#888888", "#dd8452", "#55a868"][: len(names)])
    a.bar_label(bars, labels=[f"{t:,}" for t in tps])
    a.set_ylabel("transactions / s (drain)")
    a.set_title(f"Drain of {res['messages']:,} transactions, one process each")
    qs = ["p50_ms", "p95_ms", "p99_ms", "max_ms"]
    width = 0.8 / len(qs)
    for i, q in enumerate(qs):
        xs = [j + i * width for j in range(len(res["latency"]))]
        b.bar(xs, [r[q] for r in res["latency"]], width, label=q.removesuffix("_ms"))
    b.set_xticks([j + 0.4 - width / 2 for j in range(len(res["latency"]))],
                 [f"{r['offered_tps']:,}/s\n({r['fraction']:.0%}){' EOS' if r['contender'] != 'worker' else ''}"
                  for r in res["latency"]])
    b.set_yscale("log")
    b.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    b.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    b.set_ylabel("end-to-end latency (ms)")
    b.set_title("Worker latency at fixed offered rates")
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
    p.add_argument("--rates", default="0.25,0.5,0.75", help="latency rates as fractions of the worker's drain throughput")
    p.add_argument("--no-peer", action="store_true", help="skip the Quix Streams peer")
    p.add_argument("--profile", action="store_true", help="one more worker drain under py-spy; top functions in the results")
    p.add_argument("--smoke", action="store_true", help="3,000 transactions, one 3-second latency rate (for CI)")
    a = p.parse_args()
    if a.smoke:
        a.messages, a.latency_seconds, a.rates, a.rounds = 3_000, 3.0, "0.5", 1
    started = time.monotonic()
    out, logs = a.out.resolve(), a.out.resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ensure_bench_extra()
    peer = {"python": None, "venv_seconds": 0, "error": "--no-peer"} if a.no_peer else ensure_quix_venv()
    res = {"mode": "smoke" if a.smoke else "full", "messages": a.messages, "partitions": a.partitions, "rounds": a.rounds,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "method": METHOD, "machine": machine(),
           "versions": versions(peer["python"]), "peer_venv_seconds": peer["venv_seconds"], "peer_skipped": peer["error"]}
    broker = LocalBroker(port=PORT, home=CACHE / f"broker-bench-{PORT}")
    broker.home.mkdir(parents=True, exist_ok=True)
    users = open(broker.home / ".users", "w")
    # Concurrent bench runs share the broker; the last one to finish stops it.
    fcntl.flock(users, fcntl.LOCK_SH)
    conf = {"bootstrap.servers": broker.start()}
    run_id = f"bench-{time.strftime('%H%M%S')}-{os.getpid()}"
    probe = Probe(conf)
    try:
        source = f"{run_id}-tx"
        create_topics(conf, [source], a.partitions)
        print(f"pre-filling {source} with {a.messages:,} transactions ...", flush=True)
        res["prefill"] = prefill(conf, source, a.messages)
        print(f"  {res['prefill']['rate_tps']:,} txn/s", flush=True)
        names = [n for n in CONTENDERS if n != "quix_peer" or peer["python"]]
        rounds = []
        for i in range(a.rounds):
            print(f"round {i + 1}/{a.rounds}: drain of {a.messages:,} transactions", flush=True)
            rounds.append({n: run_contender(n, conf, probe, run_id, source, a.partitions, a.messages, logs, peer["python"],
                                            suffix=f"-r{i}") for n in names})
        res["contenders"], res["ratios"] = summarise(rounds)
        fractions = [float(f) for f in a.rates.split(",")]
        max_tps = res["contenders"]["worker"]["throughput_tps"]
        if a.smoke:  # a 3,000-transaction drain is one burst, not a maximum; keep the smoke run short
            max_tps = min(max_tps, 10_000)
        print(f"latency at {', '.join(f'{f:.0%}' for f in fractions)} of {max_tps:,} txn/s, {a.latency_seconds:g} s each",
              flush=True)
        res["latency"] = latency(conf, run_id, a.partitions, max_tps, fractions, a.latency_seconds, logs)
        half = min(fractions, key=lambda f: abs(f - 0.5))
        print(f"exactly-once latency at {half:.0%}", flush=True)
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


if __name__ == "__main__":
    main()
