"""Chaos harness: real worker processes on a real local broker, faults while traffic flows, then an audit."""

from __future__ import annotations

import io
import json
import math
import random
import statistics
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import fastavro
from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, Producer

from ..avro.codec import Codec, DecodeError
from ..kafka import (
    Record, admin, answers, committed_offsets, coordinator_moving, create_topics, end_offsets, iter_topic,
    plain_producer, read_topic, send, set_topic_writable,
)
from ..records import Transaction
from ..settings import Settings
from . import traffic
from .localbroker import LocalBroker, broker_home
from .localservice import free_ports, tail
from .replica import Replica

CODEC = Codec()
# The harness's classic session.timeout.ms (short, for quick fail-over); the consumer protocol (KIP-848) takes it
# from the broker (the local broker's group.consumer.session.timeout.ms).
SESSION_S = {"classic": 6.0, "consumer": 10.0}
# How long after a kill the other partitions are watched for gaps in their verdicts (unless a fault comes first).
GAP_WINDOW_S = 30.0


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
    kill_interval_s: float = 0.0  # > 0: the kills this far apart from a tenth into the traffic, instead of spread
    terms: int = 0
    broker_restarts: int = 1
    storm: bool = False
    unwritable: bool = False
    poison_per_kind: int = 2
    delivery: str = "at_least_once"
    group_protocol: str = "classic"
    static: bool = True  # a restarted replica keeps its slot's identity (a StatefulSet pod); else it gets a new one
    port: int = 0  # 0: free ports chosen at run time, the broker kept with the run's output and stopped after it
    seed: int = 0
    out: Path = Path("var/chaos")

    @property
    def duration(self) -> float:
        """Seconds of traffic."""
        return self.transactions / self.rate

    def schedule(self) -> list[tuple[float, str]]:
        """Faults in seconds after the traffic starts, at fractions of its duration spread so they do not pile up."""
        d, spread = self.duration, 0 if self.kill_interval_s else self.kills
        events = [(0.1 * d + i * self.kill_interval_s, "kill") for i in range(self.kills - spread)]
        for kind, count, lo, hi in (("kill", spread, 0.05, 0.95), ("term", self.terms, 0.1, 0.9),
                                     ("broker_restart", self.broker_restarts, 0.4, 0.6)):
            events += [((lo + (hi - lo) * (i + 0.5) / count) * d, kind) for i in range(count)]
        if self.storm:
            events.append((0.25 * d, "storm"))
        if self.unwritable:
            events.append((0.7 * d, "unwritable"))
        return sorted((round(t, 1), kind) for t, kind in events)


@dataclass
class Report:
    """The audit: the numbers that say whether anything was lost."""

    inputs: int = 0
    poison_pills: int = 0
    unique_verdicts: int = 0
    verdict_records: int = 0
    duplicates: int = 0
    duplicates_per_kill: float | None = None
    lost: int = 0  # acknowledged inputs with neither a verdict nor a dead letter
    unacknowledged: int = 0  # inputs the traffic producer got no acknowledgement for (not counted as lost)
    hung_calls: int = 0  # replicas that stopped (exit 1) because a transactional call outlived its timeout
    traffic_producers_replaced: int = 0  # the harness's own producer lost the broker for good (see Chaos._deliver)
    dead_letters: int = 0
    dead_letters_wrong_stage: int = 0
    unexpected_dead_letters: int = 0
    committed_equals_end: bool = False
    committed: dict = field(default_factory=dict)
    end: dict = field(default_factory=dict)
    uncovered_below_commit_during_outage: int | None = None
    session_timeout_s: float = 0.0
    # Per kill: the partitions the killed replica owned, how long until each had a verdict of an input sent after the
    # kill again (the slowest; visible to a read_committed reader, and by the verdict's record timestamp), and the
    # longest gap in verdicts on the other partitions, over `window_s` from the kill.
    kills: list = field(default_factory=list)
    stall_after_last_kill_s: float | None = None  # until every partition had a verdict of an input sent after it
    stall_bound_s: float | None = None  # with kills at an interval: the session timeout + 5 s
    faults: list = field(default_factory=list)
    seconds: float = 0.0
    plan: dict = field(default_factory=dict)

    def ok(self) -> bool:
        """No loss, every poison pill dead-lettered at its stage, every offset committed; with exactly-once no
        duplicates; with kills at an interval, the stall after the last one within its bound."""
        return (self.lost == 0 and self.dead_letters == self.poison_pills and self.dead_letters_wrong_stage == 0
                and self.unexpected_dead_letters == 0 and self.committed_equals_end
                and not self.uncovered_below_commit_during_outage
                and (self.plan.get("delivery") != "exactly_once" or self.duplicates == 0)
                and (self.stall_bound_s is None or self.stall_after_last_kill_s is not None
                     and self.stall_after_last_kill_s <= self.stall_bound_s))

    def table(self) -> str:
        """The report as a small table, and a table of the kills."""
        p = self.plan
        rows = [("delivery, group protocol, static identity", f"{p.get('delivery')}, {p.get('group_protocol')}, "
                                                              f"{p.get('static')}"),
                ("inputs (transactions)", self.inputs), ("poison pills", self.poison_pills),
                ("unique verdicts", self.unique_verdicts), ("verdict records", self.verdict_records),
                ("duplicates (read_committed)", self.duplicates), ("duplicates per kill", self.duplicates_per_kill),
                ("LOST (of acknowledged inputs)", self.lost),
                ("unacknowledged inputs (not counted as lost)", self.unacknowledged),
                ("traffic producers replaced (librdkafka#5301)", self.traffic_producers_replaced),
                ("replicas stopped by a hung transactional call", self.hung_calls),
                ("dead letters", self.dead_letters), ("dead letters at the wrong stage", self.dead_letters_wrong_stage),
                ("unexpected dead letters", self.unexpected_dead_letters),
                ("committed == end offsets", self.committed_equals_end),
                ("uncovered offsets below commit (outage)", self.uncovered_below_commit_during_outage),
                ("session timeout (s)", self.session_timeout_s)]
        # A fail-over that outlasts its window includes the next fault's effects: not counted in the summary.
        clear = [k for k in self.kills if k["failover_s"][0] is not None and k["failover_s"][0] <= k["window_s"]]
        for i, what in enumerate(("visible", "written")):
            rows.append((f"fail-over per kill, {what}: median / max (s)", f"{_spread(k['failover_s'][i] for k in clear)}"
                                                                         f" ({len(clear)} of {len(self.kills)} kills)"))
        for i, what in enumerate(("visible", "written")):
            rows.append((f"longest gap elsewhere, {what}: median / max (s)", _spread(k["gap_s"][i] for k in self.kills)))
        rows += [("stall after last kill (s)", self.stall_after_last_kill_s if self.stall_bound_s is None
                  else f"{self.stall_after_last_kill_s} (bound {self.stall_bound_s})"),
                 ("faults injected", ", ".join(f"{k} x{v}" for k, v in Counter(f["fault"] for f in self.faults).items())),
                 ("wall time (s)", round(self.seconds, 1)), ("verdict", "PASS" if self.ok() else "FAIL")]
        width = max(len(k) for k, _ in rows)
        lines = [f"| {k.ljust(width)} | {v} |" for k, v in rows]
        if self.kills:
            lines += ["", "| kill at (s) | slot | partitions | fail-over visible / written (s) "
                          "| longest gap elsewhere visible / written (s) | window (s) |"]
            lines += [f"| {k['t']} | {k['slot']} | {k['partitions']} | {k['failover_s'][0]} / {k['failover_s'][1]} "
                      f"| {k['gap_s'][0]} / {k['gap_s'][1]} | {k['window_s']} |" for k in self.kills]
        return "\n".join(lines)


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
        self.slot: dict[Replica, int] = {}
        self._starts: Counter[int] = Counter()  # replicas started per slot
        self.report = Report(plan={k: str(v) for k, v in asdict(plan).items()},
                             session_timeout_s=SESSION_S[plan.group_protocol])
        self.pills = poison_pills(random.Random(plan.seed), plan.poison_per_kind)
        self.acked: dict[str, tuple[int, float]] = {}  # input acknowledged to the traffic producer -> partition, sent at
        self._unacked: dict[str, tuple] = {}  # input sent, not yet acknowledged -> key, value, headers, sent at
        self.seen: list[tuple[float, int, bytes]] = []  # verdicts as a read_committed reader saw them: when, timestamp
        self._traffic_end = math.inf
        self._stop_watching = threading.Event()
        self._settings: Settings | None = None

    @property
    def conf(self) -> dict:
        return {"bootstrap.servers": self.broker.bootstrap}

    def settings(self) -> Settings:
        """The replicas' settings: fresh topics and group, fast failure detection (built once: it takes about 2 ms)."""
        if self._settings is None:
            p = self.plan
            classic = p.group_protocol == "classic"
            self._settings = Settings(
                bootstrap_servers=self.broker.bootstrap, group_id=self.run_id, input_topic=f"{self.run_id}-tx",
                verdict_topic=f"{self.run_id}-verdicts", dead_letter_topic=f"{self.run_id}-dlq", metrics_port=0,
                delivery=p.delivery, group_protocol=p.group_protocol,
                consumer_config={"session.timeout.ms": f"{SESSION_S['classic'] * 1000:.0f}",
                                 "heartbeat.interval.ms": "500"} if classic else {},
                # librdkafka wants message.timeout.ms within the worker's transaction.timeout.ms under exactly-once.
                producer_config={"message.timeout.ms": "120000"} if p.delivery == "at_least_once" else {},
                shutdown_timeout_s=20,
            )
        return self._settings

    def start_replica(self, slot: int | None = None) -> Replica:
        """Start a replica in `slot` (a restart: the slot's identity if static), or in a new slot with a new identity."""
        slot = len(self._starts) if slot is None else slot
        self._starts[slot] += 1
        name = f"{self.run_id}-r{slot}"
        identity = {"worker_id": name, "group_instance_id": name} if self.plan.static else {
            "worker_id": f"{name}.{self._starts[slot]}"}
        replica = Replica(self.settings().model_copy(update=identity), self.out / f"r{slot}.{self._starts[slot]}.log")
        self.replicas.append(replica)
        self.slot[replica] = slot
        return replica

    def live(self) -> list[Replica]:
        """Replicas still running."""
        return [r for r in self.replicas if r.alive()]

    def fault(self, kind: str, at: float | None = None, **details) -> None:
        """Record an injected fault and when it began (time.time(), `at`; `t` is seconds into the run)."""
        at = time.time() if at is None else at
        self.report.faults.append({"t": round(at - self._t0, 2), "at": at, "fault": kind, **details})
        print(f"  [{self.report.faults[-1]['t']:7.1f}s] {kind} {details}", flush=True)

    def run(self) -> Report:
        """Run the plan and audit the topics."""
        p, s = self.plan, self.settings()
        self._t0 = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        self.broker.start()
        create_topics(self.conf, {s.input_topic: p.partitions, s.verdict_topic: p.partitions, s.dead_letter_topic: p.partitions})
        for _ in range(p.replicas):
            self.start_replica()
        for r in self.replicas:
            r.wait_assigned(60)
        watcher = threading.Thread(target=self._watch, daemon=True)
        watcher.start()
        sender = threading.Thread(target=self._produce, daemon=True)
        begin = time.time()
        sender.start()
        for at, kind in p.schedule():
            time.sleep(max(0.0, begin + at - time.time()))
            getattr(self, f"_{kind}")()
        sender.join()
        self._wait_all_committed(timeout=300)
        self._stop_watching.set()
        watcher.join(30)
        for r in self.live():
            r.wait_assigned(30)
            code = r.terminate(60)
            if code != 0:
                self.fault("unclean_final_stop", worker=r.settings.worker_id, exit=code)
        self._audit()
        self._measure()
        self.report.seconds = time.time() - self._t0
        (self.out / "report.json").write_text(json.dumps(asdict(self.report), indent=1, default=str))
        return self.report

    def diagnosis(self, lines: int = 30) -> str:
        """For a failed run: the broker's last warnings and lines, each replica's exit and last lines, the group."""
        b = self.broker
        log = tail(b.log_file, 1 << 20).splitlines()
        warnings = [line for line in log if "] WARN " in line or "] ERROR " in line]
        # The last lines too: a JVM that died says so there, not as a log4j warning.
        out = [f"broker {b.bootstrap} running={b.running()} last warnings, then last lines ({b.log_file}):",
               *warnings[-lines:], "...", *log[-5:]]
        for r in self.replicas:
            out += [f"replica {r.settings.worker_id} exit={r.proc.poll()} ({r.log_path}):",
                    *tail(r.log_path).splitlines()[-3:]]
        return "\n".join([*out, group_view(self.conf, self.settings().group_id)])

    def _produce(self) -> None:
        p = self.plan
        producer = self._traffic_producer()
        slots = dict(zip(self.rng.sample(range(p.transactions), len(self.pills)), self.pills))
        start, sent = time.monotonic(), 0
        for i, txn in enumerate(traffic.generated(p.transactions, seed=p.seed, prefix=self.run_id)):
            now = time.time()
            records = [(txn.transaction_id, txn.card_id, CODEC.encode_transaction(traffic.stamp(txn, int(now * 1000))),
                        junk_headers(self.rng) if i % 997 == 0 else None)]
            if i in slots:
                key, value, _ = slots[i]
                records.append((key, key, value, junk_headers(self.rng)))
            for identity, key, value, headers in records:
                self._send(producer, identity, key.encode(), value, headers, now)
                sent += 1
            producer.poll(0)
            ahead = start + sent / p.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        self._traffic_end = time.time()
        remaining = self._deliver(producer)
        if remaining:
            self.fault("traffic_not_acknowledged", remaining=remaining)

    def _traffic_producer(self) -> Producer:
        return plain_producer(self.conf, **{"message.timeout.ms": 600_000})

    def _send(self, producer: Producer, identity: str, key: bytes, value: bytes, headers, sent_at: float) -> None:
        """Produce one input, kept until the broker acknowledges it."""
        self._unacked[identity] = (key, value, headers, sent_at)
        send(producer, self.settings().input_topic, value, key, headers=headers,
             on_delivery=partial(self._acked, identity, sent_at))

    def _acked(self, identity: str, sent_at: float, err, msg) -> None:
        if err is None:
            self.acked[identity] = (msg.partition(), sent_at)
            self._unacked.pop(identity, None)

    def _deliver(self, producer: Producer, timeout: float = 300.0, stuck_s: float = 60.0) -> int:
        """Wait until the broker has acknowledged every input; return how many it has not.

        A producer that gets no acknowledgement for `stuck_s` while the broker answers is replaced: a metadata response
        without brokers, as a broker in controlled shutdown may send, leaves librdkafka with no broker to ask, for good
        (confluentinc/librdkafka#5301). Inputs the topic already holds count as acknowledged; a new producer sends the
        others again, so that no input is written twice.
        """
        deadline = time.monotonic() + timeout
        while self._unacked and time.monotonic() < deadline:
            before = len(self._unacked)
            producer.flush(min(stuck_s, max(0.0, deadline - time.monotonic())))
            if self._unacked and len(self._unacked) == before and answers(self.broker.bootstrap):
                producer = self._replace_traffic_producer(producer)
        return len(self._unacked)

    def _replace_traffic_producer(self, stuck: Producer) -> Producer:
        stuck.purge()
        stuck.flush(0)  # serves the purged inputs' delivery reports, which are errors
        for record in self._read(self.settings().input_topic):
            identity = _identity(record)
            if identity in self._unacked:
                self.acked[identity] = (record.partition, self._unacked.pop(identity)[3])
        producer = self._traffic_producer()
        for identity, (key, value, headers, sent_at) in list(self._unacked.items()):
            self._send(producer, identity, key, value, headers, sent_at)
        self.report.traffic_producers_replaced += 1
        print(f"  traffic producer replaced: {len(self._unacked)} inputs sent again", flush=True)
        return producer

    def _watch(self) -> None:
        """Tail the verdict topic as a read_committed reader, noting when each verdict became visible."""
        for record in iter_topic(self.conf, self.settings().verdict_topic, idle_s=math.inf):
            if self._stop_watching.is_set():
                return
            if record is not None:
                self.seen.append((time.time(), record.timestamp_ms, record.value))

    def _victim(self) -> Replica:
        """A running replica that owns partitions (a signal during start-up would prove nothing)."""
        deadline = time.monotonic() + 60
        while not (owners := [r for r in self.live() if r.owned()]) and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.rng.choice(owners or self.live() or [self.start_replica()])

    def _kill(self) -> None:
        victim = self._victim()
        owned, at = victim.owned(), time.time()
        code = victim.kill()
        slot = self.slot[victim]
        self.fault("kill", at, worker=victim.settings.worker_id, slot=slot, partitions=sorted(owned), exit=code)
        self.start_replica(slot)

    def _term(self) -> None:
        victim = self._victim()
        at = time.time()
        code = victim.terminate(60)
        self.fault("term", at, worker=victim.settings.worker_id, exit=code)
        self.start_replica(self.slot[victim])

    def _broker_restart(self) -> None:
        at = time.time()
        self.broker.stop()
        time.sleep(2)
        self.broker.start()
        self.fault("broker_restart", at, down_s=round(time.time() - at, 1))

    def _storm(self) -> None:
        at, before = time.time(), len(self.live())
        grown = [self.start_replica() for _ in range(max(0, 3 - before))]
        for r in grown:
            r.wait_assigned(30)
        time.sleep(3)
        shrink = self.live()[: max(0, len(self.live()) - 1)]
        codes = [r.terminate(60) for r in shrink]
        time.sleep(3)
        for _ in range(before - len(self.live())):
            self.start_replica()
        self.fault("rebalance_storm", at, replicas=f"{before}->3->1->{before}", term_exits=codes)

    def _unwritable(self) -> None:
        s, at = self.settings(), time.time()
        replicas = self.live()
        set_topic_writable(self.conf, s.verdict_topic, False)
        codes = [r.wait(120) for r in replicas]
        loud = all("worker_failed" in r.log() for r in replicas)
        uncovered = self._uncovered_below_commit()
        self.report.uncovered_below_commit_during_outage = uncovered
        set_topic_writable(self.conf, s.verdict_topic, True)
        for r in replicas:
            self.start_replica(self.slot[r])
        self.fault("verdict_topic_unwritable", at, exits=codes, stopped_loudly=loud, uncovered_below_commit=uncovered)

    def _uncovered_below_commit(self) -> int:
        """Input offsets below the committed position that have neither a verdict nor a dead letter yet."""
        s = self.settings()
        committed = committed_offsets(self.conf, s.group_id, s.input_topic)
        inputs = read_topic(self.conf, s.input_topic, sum(end_offsets(self.conf, s.input_topic).values()), timeout=60)
        covered = self._covered_ids()
        return sum(1 for r in inputs if r.offset < committed.get(r.partition, -1) and _identity(r) not in covered)

    def _covered_ids(self) -> set[str]:
        s = self.settings()
        ids = {CODEC.decode_verdict(r.value)["transaction_id"] for r in self._read(s.verdict_topic)}
        return ids | {_identity(r) for r in self._read(s.dead_letter_topic)}

    def _read(self, topic: str, quiet_s: float = 3.0) -> list[Record]:
        """What a read_committed reader gets from a topic: read until quiet (under exactly-once, transaction markers
        and aborted records take offsets too, so the end offsets are no count of the records)."""
        records: list[Record] = []
        last = time.monotonic()
        for record in iter_topic(self.conf, topic, idle_s=60):
            if record is not None:
                records.append(record)
                last = time.monotonic()
            elif records and time.monotonic() - last > quiet_s:
                break
        return records

    def _wait_all_committed(self, timeout: float) -> None:
        s = self.settings()
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if not self.live():
                self.start_replica()
            try:
                committed = committed_offsets(self.conf, s.group_id, s.input_topic)
                end = end_offsets(self.conf, s.input_topic)
                if committed == end:
                    return
                last = f"committed {committed}, end {end}"
            except KafkaException as exc:  # e.g. offsets of a transaction not yet committed or aborted: ask again
                last = str(exc)
            time.sleep(1)
        self.fault("offsets_not_committed", waited_s=timeout, last=last)

    def _audit(self) -> None:
        p, s, r = self.plan, self.settings(), self.report
        pills = {key: stage for key, _, stage in self.pills}
        expected_ids = {t.transaction_id for t in traffic.generated(p.transactions, seed=p.seed, prefix=self.run_id)}
        verdicts = Counter(CODEC.decode_verdict(rec.value)["transaction_id"] for rec in self._read(s.verdict_topic))
        dead = self._read(s.dead_letter_topic)
        dead_keys = Counter((rec.key or b"").decode(errors="replace") for rec in dead)
        r.inputs, r.poison_pills = len(expected_ids), len(pills)
        r.unacknowledged = len(expected_ids) + len(pills) - len(self.acked)
        r.hung_calls = sum("did not return within" in replica.log() for replica in self.replicas)
        r.unique_verdicts = len(verdicts.keys() & expected_ids)
        r.verdict_records = sum(verdicts.values())
        r.duplicates = r.verdict_records - len(verdicts) + sum(c - 1 for c in dead_keys.values())
        kills = sum(1 for f in r.faults if f["fault"] == "kill")
        r.duplicates_per_kill = round(r.duplicates / kills, 1) if kills else None
        # An input the traffic producer never got acknowledged may never have been written: not the worker's loss.
        r.lost = len(self.acked.keys() - verdicts.keys() - {_identity(rec) for rec in dead})
        r.dead_letters = len(dead_keys.keys() & pills.keys())
        r.dead_letters_wrong_stage = sum(
            1 for rec in dead if rec.key and rec.key.decode() in pills
            and rec.headers.get("fraud.errors.stage", b"").decode() != pills[rec.key.decode()])
        r.unexpected_dead_letters = len(dead_keys.keys() - pills.keys())
        r.end = end_offsets(self.conf, s.input_topic)
        try:
            r.committed = committed_offsets(self.conf, s.group_id, s.input_topic)
        except KafkaException as exc:  # reported, so that the rest of the audit still says what was lost
            r.committed = {"error": str(exc)}
        r.committed_equals_end = r.committed == r.end

    def _measure(self) -> None:
        """Per kill: fail-over of the killed replica's partitions, the longest verdict gap on the others; the stall."""
        p, r = self.plan, self.report
        verdicts: dict[int, list[tuple[float, float, float]]] = defaultdict(list)  # input partition -> clocks, sent at
        for seen, written_ms, value in self.seen:
            sent = self.acked.get(CODEC.decode_verdict(value)["transaction_id"])
            if sent:
                verdicts[sent[0]].append((seen, written_ms / 1000, sent[1]))
        starts = sorted(f["at"] for f in r.faults)
        kills = [f for f in r.faults if f["fault"] == "kill"]
        for k in kills:
            at, mine = k["at"], set(k["partitions"])
            end = min([at + GAP_WINDOW_S, self._traffic_end] + [t for t in starts if t > at])
            others = set(range(p.partitions)) - mine
            r.kills.append({"t": k["t"], "slot": k["slot"], "partitions": k["partitions"],
                            "failover_s": [_recovery(verdicts, mine, at, clock) for clock in (0, 1)],
                            "gap_s": [_longest_gap(verdicts, others, at, end, clock) for clock in (0, 1)],
                            "window_s": round(max(0.0, end - at), 1)})
        if kills:
            r.stall_after_last_kill_s = _recovery(verdicts, range(p.partitions), kills[-1]["at"], 0)
        if p.kill_interval_s and kills:
            r.stall_bound_s = r.session_timeout_s + 5


def group_view(conf: dict, group: str, timeout: float = 20.0) -> str:
    """A group as the admin API sees it: state, members' partitions, and offsets ignoring open transactions."""
    client, deadline = admin(conf), time.monotonic() + timeout
    while True:
        try:
            g = client.describe_consumer_groups([group], request_timeout=10)[group].result(15)
            members = {m.client_id: sorted(tp.partition for tp in m.assignment.topic_partitions) for m in g.members}
            offsets = client.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)], require_stable=False,
                                                         request_timeout=10)[group].result(15)
            found = {tp.partition: tp.offset for tp in offsets.topic_partitions}
            return f"group {group} {g.state.name}: members {members}, offsets (require_stable=False) {found}"
        except TimeoutError:
            return f"group {group}: the admin API did not answer within 15 s"
        except KafkaException as exc:
            if not coordinator_moving(exc) or time.monotonic() > deadline:
                return f"group {group}: the admin API failed: {exc}"
            time.sleep(0.5)


def _recovery(verdicts: dict, partitions, at: float, clock: int) -> float | None:
    """Seconds from `at` until every one of these partitions had a verdict of an input sent after `at`, by `clock`
    (0: seen by a reader, 1: record timestamp); None if one never did or there are none."""
    firsts = [min((v[clock] for v in verdicts[p] if v[2] >= at), default=None) for p in partitions]
    if not firsts or None in firsts:
        return None
    return round(max(firsts) - at, 2)


def _longest_gap(verdicts: dict, partitions, at: float, end: float, clock: int) -> float | None:
    """The longest time between `at` and `end` in which one of these partitions had no verdict, by `clock`."""
    if not partitions or end <= at:
        return None
    gaps = []
    for p in partitions:
        times = sorted(v[clock] for v in verdicts[p] if at <= v[clock] <= end)
        gaps += [b - a for a, b in zip([at, *times], [*times, end])]
    return round(max(gaps), 2)


def _spread(values) -> str:
    """`median / max` of the values that were measured."""
    known = [v for v in values if v is not None]
    return f"{statistics.median(known):.2f} / {max(known):.2f}" if known else "n/a"


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
    report = None
    try:
        report = chaos.run()
    finally:
        try:
            if report is None or not report.ok():
                print(chaos.diagnosis(), flush=True)
        finally:
            for r in chaos.replicas:
                r.kill()
            if not plan.port:  # a broker on ports chosen for this run serves no one after it
                chaos.broker.stop()
    print(report.table())
    print(f"report: {chaos.out / 'report.json'}")
    return report
