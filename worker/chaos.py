"""Chaos harness: real worker processes on a real local broker, faults while traffic flows, then an audit."""

from __future__ import annotations

import io
import json
import math
import random
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fastavro

from . import traffic
from .codec import Codec, DecodeError
from .kafka import (
    committed_offsets, create_topics, end_offsets, plain_producer, read_topic, send, set_topic_writable,
)
from .localbroker import LocalBroker, broker_home
from .localservice import free_ports
from .records import Transaction
from .replica import Replica
from .settings import Settings

CODEC = Codec()


def other_schema_record() -> bytes:
    """Valid Avro of a record that is not a Transaction."""
    schema = fastavro.parse_schema({"type": "record", "name": "Refund",
                                    "fields": [{"name": "refund_id", "type": "string"}, {"name": "cents", "type": "long"}]})
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, {"refund_id": "r-1", "cents": 1234})
    return buf.getvalue()


def _valid(txn: Transaction, **changes) -> bytes:
    fields = {n: getattr(txn, n) for n in Transaction.__slots__} | {"event_time": 1_790_000_000_000} | changes
    return CODEC.encode_transaction(Transaction(**fields))


def poison_pills(rng: random.Random, per_kind: int) -> list[tuple[str, bytes, str]]:
    """(key, value, expected dead-letter stage) for every kind of hostile message."""
    base = next(traffic.generated(1, seed=99, prefix="poison"))
    valid = _valid(base)
    kinds = {
        "random-bytes": (lambda: rng.randbytes(rng.randint(1, 300)), "deserialize"),
        "truncated": (lambda: valid[: rng.randint(1, len(valid) - 1)], "deserialize"),
        "empty": (lambda: b"", "deserialize"),
        "other-schema": (other_schema_record, "deserialize"),
        "gigabyte-length": (lambda: b"\xfe\xff\xff\xff\x0f" + rng.randbytes(20), "deserialize"),
        "endless-varint": (lambda: b"\xff" * 200, "deserialize"),
        "oversized": (lambda: valid + rng.randbytes(200_000), "deserialize"),
        "nan": (lambda: _valid(base, distance_from_home=math.nan), "validate"),
        "inf": (lambda: _valid(base, ratio_to_median_purchase_price=-math.inf), "validate"),
        "negative": (lambda: _valid(base, amount=-5.0), "validate"),
    }
    return [(f"poison-{kind}-{i}", make(), stage) for kind, (make, stage) in kinds.items() for i in range(per_kind)]


def junk_headers(rng: random.Random) -> list[tuple[str, bytes | None]]:
    """Hostile but legal headers: binary values, empty and null values, many of them."""
    return [(f"x-junk-{i}", rng.randbytes(rng.randint(0, 64))) for i in range(20)] + [("x-null", None), ("", b"")]


@dataclass
class Plan:
    """What to run: traffic, replicas and the faults to inject."""

    transactions: int = 20_000
    rate: float = 800.0
    partitions: int = 6
    replicas: int = 2
    kills: int = 3
    terms: int = 0
    broker_restarts: int = 1
    storm: bool = False
    unwritable: bool = False
    poison_per_kind: int = 2
    port: int = 0  # 0: free ports chosen at run time, the broker kept with the run's output and stopped after it
    seed: int = 0
    out: Path = Path("var/chaos")

    def schedule(self) -> list[tuple[float, str]]:
        """Faults at fractions of the traffic's duration, spread so they do not pile up."""
        events = []
        for kind, count, lo, hi in (("kill", self.kills, 0.05, 0.95), ("term", self.terms, 0.1, 0.9),
                                     ("broker_restart", self.broker_restarts, 0.4, 0.6)):
            events += [(lo + (hi - lo) * (i + 0.5) / count, kind) for i in range(count)]
        if self.storm:
            events.append((0.25, "storm"))
        if self.unwritable:
            events.append((0.7, "unwritable"))
        return sorted(events)


@dataclass
class Report:
    """The audit: the numbers that say whether anything was lost."""

    inputs: int = 0
    poison_pills: int = 0
    unique_verdicts: int = 0
    verdict_records: int = 0
    duplicates: int = 0
    lost: int = 0
    dead_letters: int = 0
    dead_letters_wrong_stage: int = 0
    unexpected_dead_letters: int = 0
    committed_equals_end: bool = False
    committed: dict = field(default_factory=dict)
    end: dict = field(default_factory=dict)
    uncovered_below_commit_during_outage: int | None = None
    faults: list = field(default_factory=list)
    seconds: float = 0.0
    plan: dict = field(default_factory=dict)

    def ok(self) -> bool:
        """No loss, every poison pill dead-lettered at its stage, every offset committed."""
        return (self.lost == 0 and self.dead_letters == self.poison_pills and self.dead_letters_wrong_stage == 0
                and self.unexpected_dead_letters == 0 and self.committed_equals_end
                and not self.uncovered_below_commit_during_outage)

    def table(self) -> str:
        """The report as a small table."""
        rows = [("inputs (transactions)", self.inputs), ("poison pills", self.poison_pills),
                ("unique verdicts", self.unique_verdicts), ("verdict records", self.verdict_records),
                ("duplicates", self.duplicates), ("LOST", self.lost), ("dead letters", self.dead_letters),
                ("dead letters at the wrong stage", self.dead_letters_wrong_stage),
                ("unexpected dead letters", self.unexpected_dead_letters),
                ("committed == end offsets", self.committed_equals_end),
                ("uncovered offsets below commit (outage)", self.uncovered_below_commit_during_outage),
                ("faults injected", ", ".join(f"{k} x{v}" for k, v in Counter(f["fault"] for f in self.faults).items())),
                ("wall time (s)", round(self.seconds, 1)), ("verdict", "PASS" if self.ok() else "FAIL")]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"| {k.ljust(width)} | {v} |" for k, v in rows)


class Chaos:
    """One chaos run: a broker of its own, fresh topics, replicas, a traffic thread and the fault schedule."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.rng = random.Random(plan.seed)
        self.run_id = f"chaos-{time.strftime('%H%M%S')}-{plan.seed}"
        self.out = Path(plan.out) / self.run_id
        if plan.port:
            self.broker = LocalBroker(port=plan.port, home=broker_home(plan.port, "broker-chaos"), acls=True)
        else:
            port, controller = free_ports(2)
            self.broker = LocalBroker(port=port, controller_port=controller, home=self.out / "broker", acls=True)
        self.replicas: list[Replica] = []
        self.report = Report(plan={k: str(v) for k, v in asdict(plan).items()})
        self._n = 0
        self.pills = poison_pills(random.Random(plan.seed), plan.poison_per_kind)

    @property
    def conf(self) -> dict:
        return {"bootstrap.servers": self.broker.bootstrap}

    def settings(self) -> Settings:
        """The replicas' settings: fresh topics and group, fast failure detection."""
        return Settings(
            bootstrap_servers=self.broker.bootstrap, group_id=self.run_id, input_topic=f"{self.run_id}-tx",
            verdict_topic=f"{self.run_id}-verdicts", dead_letter_topic=f"{self.run_id}-dlq", metrics_port=0,
            consumer_config={"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"},
            producer_config={"message.timeout.ms": "120000"}, shutdown_timeout_s=20,
        )

    def start_replica(self) -> Replica:
        """Start one more replica."""
        self._n += 1
        s = self.settings().model_copy(update={"worker_id": f"{self.run_id}-w{self._n}"})
        replica = Replica(s, self.out / f"worker-{self._n}.log")
        self.replicas.append(replica)
        return replica

    def live(self) -> list[Replica]:
        """Replicas still running."""
        return [r for r in self.replicas if r.alive()]

    def fault(self, kind: str, **details) -> None:
        """Record an injected fault."""
        self.report.faults.append({"t": round(time.monotonic() - self._t0, 2), "fault": kind, **details})
        print(f"  [{self.report.faults[-1]['t']:7.1f}s] {kind} {details}", flush=True)

    def run(self) -> Report:
        """Run the plan and audit the topics."""
        p, s = self.plan, self.settings()
        self._t0 = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        self.broker.start()
        create_topics(self.conf, {s.input_topic: p.partitions, s.verdict_topic: p.partitions, s.dead_letter_topic: p.partitions})
        for _ in range(p.replicas):
            self.start_replica()
        for r in self.replicas:
            r.wait_assigned(60)
        sender = threading.Thread(target=self._produce, daemon=True)
        sender.start()
        duration = (p.transactions + len(self.pills)) / p.rate
        for at, kind in p.schedule():
            time.sleep(max(0.0, self._t0 + 5 + at * duration - time.monotonic()))
            getattr(self, f"_{kind}")()
        sender.join()
        self._wait_all_committed(timeout=300)
        for r in self.live():
            r.wait_assigned(30)
            code = r.terminate(60)
            if code != 0:
                self.fault("unclean_final_stop", exit=code)
        self._audit()
        self.report.seconds = time.monotonic() - self._t0
        (self.out / "report.json").write_text(json.dumps(asdict(self.report), indent=1, default=str))
        return self.report

    def _produce(self) -> None:
        p, s = self.plan, self.settings()
        producer = plain_producer(self.conf, **{"message.timeout.ms": 600_000})
        pills = self.pills
        slots = {self.rng.randrange(p.transactions): pill for pill in pills}
        start, sent = time.monotonic(), 0
        for i, txn in enumerate(traffic.generated(p.transactions, seed=p.seed, prefix=self.run_id)):
            records = [(txn.card_id.encode(), CODEC.encode_transaction(traffic.stamp(txn, int(time.time() * 1000))),
                        junk_headers(self.rng) if i % 997 == 0 else None)]
            if i in slots:
                key, value, _ = slots.pop(i)
                records.append((key.encode(), value, junk_headers(self.rng)))
            for key, value, headers in records:
                send(producer, s.input_topic, value, key, headers=headers)
                sent += 1
            producer.poll(0)
            ahead = start + sent / p.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        for key, value, _ in slots.values():
            producer.produce(s.input_topic, value, key.encode())
        remaining = producer.flush(300)
        if remaining:
            self.fault("traffic_not_acknowledged", remaining=remaining)

    def _victim(self) -> Replica:
        """A running replica that has joined the group (a signal during start-up would prove nothing)."""
        victim = self.rng.choice(self.live() or [self.start_replica()])
        victim.wait_assigned(60)
        return victim

    def _kill(self) -> None:
        victim = self._victim()
        code = victim.kill()
        self.fault("kill", worker=victim.settings.worker_id, exit=code)
        self.start_replica()

    def _term(self) -> None:
        victim = self._victim()
        code = victim.terminate(60)
        self.fault("term", worker=victim.settings.worker_id, exit=code)
        self.start_replica()

    def _broker_restart(self) -> None:
        t = time.monotonic()
        self.broker.stop()
        time.sleep(2)
        self.broker.start()
        self.fault("broker_restart", down_s=round(time.monotonic() - t, 1))

    def _storm(self) -> None:
        before = len(self.live())
        grown = [self.start_replica() for _ in range(max(0, 3 - before))]
        for r in grown:
            r.wait_assigned(30)
        time.sleep(3)
        shrink = self.live()[: max(0, len(self.live()) - 1)]
        codes = [r.terminate(60) for r in shrink]
        time.sleep(3)
        for _ in range(before - len(self.live())):
            self.start_replica()
        self.fault("rebalance_storm", replicas=f"{before}->3->1->{before}", term_exits=codes)

    def _unwritable(self) -> None:
        s = self.settings()
        replicas = self.live()
        set_topic_writable(self.conf, s.verdict_topic, False)
        codes = [r.wait(120) for r in replicas]
        loud = all("worker_failed" in r.log() for r in replicas)
        uncovered = self._uncovered_below_commit()
        self.report.uncovered_below_commit_during_outage = uncovered
        set_topic_writable(self.conf, s.verdict_topic, True)
        for _ in replicas:
            self.start_replica()
        self.fault("verdict_topic_unwritable", exits=codes, stopped_loudly=loud, uncovered_below_commit=uncovered)

    def _uncovered_below_commit(self) -> int:
        """Input offsets below the committed position that have neither a verdict nor a dead letter yet."""
        s = self.settings()
        committed = committed_offsets(self.conf, s.group_id, s.input_topic)
        inputs = read_topic(self.conf, s.input_topic, sum(end_offsets(self.conf, s.input_topic).values()), timeout=60)
        covered = self._covered_ids()
        return sum(1 for r in inputs if r.offset < committed.get(r.partition, -1) and _identity(r) not in covered)

    def _covered_ids(self) -> set[str]:
        s = self.settings()
        ids = {CODEC.decode_verdict(r.value)["transaction_id"]
               for r in read_topic(self.conf, s.verdict_topic, sum(end_offsets(self.conf, s.verdict_topic).values()), 60)}
        dead = read_topic(self.conf, s.dead_letter_topic, sum(end_offsets(self.conf, s.dead_letter_topic).values()), 60)
        return ids | {_identity(r) for r in dead}

    def _wait_all_committed(self, timeout: float) -> None:
        s = self.settings()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.live():
                self.start_replica()
            if committed_offsets(self.conf, s.group_id, s.input_topic) == end_offsets(self.conf, s.input_topic):
                return
            time.sleep(1)

    def _audit(self) -> None:
        p, s, r = self.plan, self.settings(), self.report
        pills = {key: stage for key, _, stage in self.pills}
        expected_ids = {t.transaction_id for t in traffic.generated(p.transactions, seed=p.seed, prefix=self.run_id)}
        verdicts = Counter(CODEC.decode_verdict(rec.value)["transaction_id"] for rec in read_topic(
            self.conf, s.verdict_topic, sum(end_offsets(self.conf, s.verdict_topic).values()), 120))
        dead = read_topic(self.conf, s.dead_letter_topic, sum(end_offsets(self.conf, s.dead_letter_topic).values()), 60)
        dead_keys = Counter((rec.key or b"").decode(errors="replace") for rec in dead)
        r.inputs, r.poison_pills = len(expected_ids), len(pills)
        r.unique_verdicts = len(verdicts.keys() & expected_ids)
        r.verdict_records = sum(verdicts.values())
        r.duplicates = r.verdict_records - len(verdicts) + sum(c - 1 for c in dead_keys.values())
        dead_ids = {_identity(rec) for rec in dead}
        r.lost = len(expected_ids - verdicts.keys() - dead_ids) + len(pills.keys() - dead_keys.keys())
        r.dead_letters = len(dead_keys.keys() & pills.keys())
        r.dead_letters_wrong_stage = sum(
            1 for rec in dead if rec.key and rec.key.decode() in pills
            and rec.headers.get("fraud.errors.stage", b"").decode() != pills[rec.key.decode()])
        r.unexpected_dead_letters = len(dead_keys.keys() - pills.keys())
        r.committed = committed_offsets(self.conf, s.group_id, s.input_topic)
        r.end = end_offsets(self.conf, s.input_topic)
        r.committed_equals_end = r.committed == r.end


def _identity(record) -> str:
    """What an input or dead letter stands for: a poison pill's key, else the transaction id."""
    key = (record.key or b"").decode(errors="replace")
    if key.startswith("poison-"):
        return key
    try:
        return CODEC.decode_transaction(record.value).transaction_id
    except DecodeError:
        return key


def run(plan: Plan) -> Report:
    """Run a plan; print the table; return the report."""
    chaos = Chaos(plan)
    print(f"chaos {chaos.run_id}: {plan.transactions:,} transactions at {plan.rate:,.0f}/s, "
          f"{plan.replicas} replicas, schedule {plan.schedule()}", flush=True)
    try:
        report = chaos.run()
    finally:
        for r in chaos.replicas:
            r.kill()
        if not plan.port:  # a broker on ports chosen for this run serves no one after it
            chaos.broker.stop()
    print(report.table())
    print(f"report: {chaos.out / 'report.json'}")
    return report
