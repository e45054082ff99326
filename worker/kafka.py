"""The only confluent_kafka user: client configs, batch polling, producing, commits, rebalances, topics."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

from confluent_kafka import (
    OFFSET_BEGINNING, TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, KafkaException, Producer, TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import (
    AclBinding, AclBindingFilter, AclOperation, AclPermissionType, AdminClient, NewTopic, ResourcePatternType,
    ResourceType,
)

from .logs import get_logger
from .offsets import TopicPartition as TP
from .records import Headers, Message
from .settings import TRANSACTION_TIMEOUT_MS, Settings

# Produce errors that a record can cause by itself (its size, its timestamp, a null key on a compacted topic). The
# broker fails the whole produce batch for them, so a record refused in a batch is retried alone before it is judged.
RECORD_ERRORS = frozenset(
    {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD, KafkaError.INVALID_MSG_SIZE,
     KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_TIMESTAMP}
)
# librdkafka's FAIL and ERROR log lines repeat what error_cb reports; one line per error is enough.
_REPORTED_BY_ERROR_CB = frozenset({"FAIL", "ERROR"})


class KafkaFatal(RuntimeError):
    """The shell cannot go on: the broker or a topic is unusable."""


class Interrupted(Exception):
    """The stop event was set while waiting for room in the producer's queue."""


class Aborting(Exception):
    """The open transaction failed (librdkafka refuses produce() in it); it must be aborted."""


class Refused(Exception):
    """librdkafka refused one record in produce() itself (for example larger than message.max.bytes)."""

    def __init__(self, error: KafkaError):
        super().__init__(error.str())
        self.error = error


class _ToStructlog(logging.Handler):
    """Forwards librdkafka's log lines to structlog, so stdout stays JSON and stderr stays quiet."""

    def emit(self, record: logging.LogRecord) -> None:
        facility = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if facility not in _REPORTED_BY_ERROR_CB:
            get_logger("librdkafka").warning("librdkafka", message=record.getMessage()[:500])


LIBRDKAFKA_LOG = logging.getLogger("fraud_worker.librdkafka")
LIBRDKAFKA_LOG.addHandler(_ToStructlog())
LIBRDKAFKA_LOG.propagate = False
# Tools (traffic, readers, the chaos harness) keep librdkafka quiet: a broker restart is their normal.
QUIET_LOG = logging.getLogger("fraud_worker.tools")
QUIET_LOG.addHandler(logging.NullHandler())
QUIET_LOG.propagate = False


def client_config(settings: Settings) -> dict:
    """Settings shared by every client, secrets included; never log the result."""
    return {
        "bootstrap.servers": settings.bootstrap_servers,
        "client.id": settings.worker_id,
        "logger": LIBRDKAFKA_LOG,
        # librdkafka leaves Nagle's algorithm on (kafka-clients never does): small requests then wait for the
        # broker's delayed ACK, up to 40 ms on Linux, in the worker's latency tail.
        "socket.nagle.disable": True,
        **settings.security_config(),
    }


def consumer_config(settings: Settings) -> dict:
    """The consumer: manual commits only, incremental rebalancing, bounded fetches."""
    return {
        **client_config(settings),
        "group.id": settings.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        **group_config(settings),
        "enable.partition.eof": False,
        "message.max.bytes": max(settings.max_message_bytes * 2, 1_000_000),
        # librdkafka prefetches up to 64 MiB (and 100,000 records per partition) by default, about 400 bytes of memory
        # per record; 4 MiB and 10,000 records are 50 ms of input at full speed and keep peak RSS near 170 MiB.
        "queued.max.messages.kbytes": 4096,
        "queued.min.messages": 10000,
        # Once that queue is full, librdkafka waits fetch.queue.backoff.ms (default 1000) before fetching again: the
        # worker then empties it and idles for the rest of the second, a quarter of its time at full speed (measured).
        "fetch.queue.backoff.ms": 20,
        **settings.consumer_config,
    }


def group_config(settings: Settings) -> dict:
    """Group membership: the protocol's own settings, and the static member id if there is one.

    Classic: cooperative-sticky, and a 10 s session (librdkafka's 45 s would leave a dead replica's partitions
    unread that long; heartbeats come from librdkafka's thread, so a slow batch does not end the session). The
    consumer protocol (KIP-848) takes its session and heartbeat from the broker (group.consumer.session.timeout.ms).
    """
    if settings.group_protocol == "consumer":
        conf = {"group.protocol": "consumer"}
    else:
        conf = {"partition.assignment.strategy": "cooperative-sticky", "session.timeout.ms": 10_000,
                "heartbeat.interval.ms": 1_000}
    if settings.group_instance_id:
        conf["group.instance.id"] = settings.group_instance_id
    return conf


def transactional_id(settings: Settings) -> str:
    """The exactly-once producer's id: stable across restarts of one replica, so its successor fences it (KIP-98)."""
    return f"{settings.group_id}.{settings.group_instance_id or settings.worker_id}"


def producer_config(settings: Settings) -> dict:
    """The producer: idempotent, acks=all, a short linger for batching; transactional for exactly-once."""
    transactional = {}
    if settings.delivery == "exactly_once":
        # A replica that dies holds its open transaction, and so every read_committed reader of the partitions it
        # wrote, until the coordinator aborts it: after transaction.timeout.ms (Kafka's default 60 s) unless a
        # successor with the same id starts first.
        transactional = {"transactional.id": transactional_id(settings), "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS}
    return {
        **client_config(settings),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        # Unacknowledged output may otherwise grow to 1 GiB while the broker is slow or away.
        "queue.buffering.max.kbytes": 65536,
        # Also the size of the delivery-slot ring (DeliverySlots); a quarter second of output at full speed.
        "queue.buffering.max.messages": 32768,
        **transactional,
        **settings.producer_config,
    }


def admin(conf: dict) -> AdminClient:
    """An AdminClient for the given client config."""
    return AdminClient({"logger": QUIET_LOG, **conf})


def create_topics(conf: dict, partitions: dict[str, int], replication: int = 1, timeout: float = 30.0,
                  min_insync_replicas: int | None = None) -> list[str]:
    """Create topics that do not exist yet; return those created (existing topics are left as they are).

    `replication` is the replication factor; -1 takes the broker's default.replication.factor (Kafka 2.4+).
    `min_insync_replicas`, if given, is set as the topics' min.insync.replicas config. A ValueError names a setting
    that cannot work (a replication factor below -1 or 0, or more in-sync replicas than replicas).
    """
    from confluent_kafka.admin import ConfigResource

    if replication == 0 or replication < -1:
        raise ValueError(f"replication factor must be -1 (the broker's default) or at least 1, not {replication}")
    if min_insync_replicas is not None and min_insync_replicas < 1:
        raise ValueError(f"min.insync.replicas must be at least 1, not {min_insync_replicas}")
    client = admin(conf)
    metadata = client.list_topics(timeout=timeout)
    config = {}
    if min_insync_replicas is not None:
        config["min.insync.replicas"] = str(min_insync_replicas)
        replicas, whose = replication, ""
        if replication == -1:  # the broker's default.replication.factor, if this client may read it
            replicas, whose = None, " (the broker's default)"
            try:
                resource = ConfigResource(ConfigResource.Type.BROKER, str(next(iter(metadata.brokers))))
                entries = client.describe_configs([resource], request_timeout=timeout)[resource].result(timeout)
                replicas = int(entries["default.replication.factor"].value)
            except (KafkaException, KeyError, StopIteration, ValueError, TypeError):
                pass
        if replicas is not None and min_insync_replicas > replicas:
            raise ValueError(f"min.insync.replicas {min_insync_replicas} exceeds the replication factor "
                             f"{replicas}{whose}: every acks=all write would fail")
    wanted = [NewTopic(t, num_partitions=n, replication_factor=replication, config=config)
              for t, n in partitions.items() if t not in metadata.topics]
    created = []
    for topic, future in (client.create_topics(wanted, operation_timeout=timeout) if wanted else {}).items():
        try:
            future.result()
            created.append(topic)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    return created


def describe_topics(conf: dict, topics: Iterable[str], timeout: float,
                    stop_early: Callable[[], bool] = lambda: False) -> dict[str, int]:
    """Partition count per existing topic; raise KafkaFatal if the broker cannot be reached in time."""
    client = admin(conf)
    deadline = time.monotonic() + timeout
    while True:
        try:
            md = client.list_topics(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
            return {t: len(md.topics[t].partitions) for t in topics if t in md.topics and md.topics[t].error is None}
        except KafkaException as exc:
            client.poll(0)  # serves error_cb, which is where an authentication failure is reported
            if stop_early() or time.monotonic() >= deadline:
                raise KafkaFatal(
                    f"cannot reach Kafka at {conf['bootstrap.servers']} within {timeout:g}s: {exc.args[0].str()}"
                ) from None


class DeliverySlots:
    """Per-record identity for delivery reports without an allocation per record: a ring of prebuilt callbacks.

    Record i of a batch gets the callback of slot (first + i) mod capacity, which reports `on_delivery(i, err)` for the
    batch that claimed it. librdkafka holds at most queue.buffering.max.messages records whose report has not been
    served, and a batch claims its slots before it produces any record, so a ring of that many plus the largest batch
    never hands out a slot still in flight. A fresh partial per record costs about
    1 µs of CPU per verdict (measured), a quarter of the worker's whole budget.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._owners: list = [None] * capacity
        self._callbacks = [partial(self._delivered, slot) for slot in range(capacity)]
        self._next = 0

    def claim(self, on_delivery: Callable[[int, KafkaError | None], None], n: int) -> list:
        """The callbacks for the next n records of one batch."""
        if n > self.capacity:
            raise ValueError(f"a batch of {n} exceeds the {self.capacity} delivery slots")
        first, entry = self._next, (on_delivery, self._next)
        end = first + n
        if end <= self.capacity:
            self._owners[first:end] = [entry] * n
            callbacks = self._callbacks[first:end]
        else:
            wrap = end - self.capacity
            self._owners[first:] = [entry] * (n - wrap)
            self._owners[:wrap] = [entry] * wrap
            callbacks = self._callbacks[first:] + self._callbacks[:wrap]
        self._next = end % self.capacity
        return callbacks

    def _delivered(self, slot: int, err: KafkaError | None, _msg) -> None:
        on_delivery, first = self._owners[slot]
        self._owners[slot] = None  # a reported slot must not keep its batch alive until the ring comes round
        on_delivery((slot - first) % self.capacity, err)


@contextmanager
def _naming(client: str, variable: str) -> Iterator[None]:
    """Turn librdkafka's refusal of a configuration into ConfigError naming the client and the setting."""
    try:
        yield
    except KafkaException as exc:
        raise ConfigError(f"invalid Kafka {client} configuration (see {variable}): {exc.args[0].str()}") from None


class ConfigError(ValueError):
    """librdkafka refused a client configuration."""


class KafkaIO:
    """One consumer and one producer, wrapped so the loop sees only plain calls."""

    def __init__(
        self,
        settings: Settings,
        on_assign: Callable[[set[TP]], None],
        on_revoke: Callable[[set[TP], bool], None],
        on_error: Callable[[KafkaError], None],
        on_commit: Callable[[KafkaError | None, dict[TP, int]], None],
        failed: Callable[[], bool] = lambda: False,
        stopping: Callable[[], bool] = lambda: False,
    ):
        """Create the clients; raise ConfigError if librdkafka refuses the configuration."""
        self.settings = settings
        self.transactional = settings.delivery == "exactly_once"
        self.in_transaction = False
        # Each record in a produce request of its own (flushed before the next): for records that a topic accepts
        # alone but refuses in a batch, inside a transaction, where the batch.num.messages=1 producer cannot be used.
        self.one_at_a_time = False
        self.failed, self.stopping = failed, stopping
        self._on_assign, self._on_revoke = on_assign, on_revoke
        common = {"error_cb": on_error}
        with _naming("producer", "FRAUD_PRODUCER_CONFIG"):
            self.producer = Producer({**producer_config(settings), **common})
        # Records refused in a batch are retried alone, one per produce request, to find the one refused; the
        # producer for that is made on the first refusal.
        self._single_config = {**producer_config(settings), **common, "batch.num.messages": 1, "linger.ms": 0}
        self._single: Producer | None = None
        queued = int(producer_config(settings).get("queue.buffering.max.messages", 100_000))
        self._slots = DeliverySlots(queued + settings.batch_max_size)
        with _naming("consumer", "FRAUD_CONSUMER_CONFIG"):
            self.consumer = Consumer(
                {
                    **consumer_config(settings),
                    **common,
                    "on_commit": lambda err, parts: on_commit(*_commit_result(err, parts)),
                }
            )

    def subscribe(self) -> None:
        """Join the group on the input topic."""
        self.consumer.subscribe(
            [self.settings.input_topic],
            on_assign=lambda c, parts: self._on_assign({(p.topic, p.partition) for p in parts}),
            on_revoke=lambda c, parts: self._on_revoke({(p.topic, p.partition) for p in parts}, False),
            on_lost=lambda c, parts: self._on_revoke({(p.topic, p.partition) for p in parts}, True),
        )

    def poll_batch(self, max_size: int, max_wait_s: float, block_s: float, budget_s: float = 0.0,
                   cost_s: float = 0.0) -> list[Message]:
        """Whatever is already fetched (up to max_size); else block for one and linger for more: max_wait_s, cut so
        that the first record's age plus `cost_s` (the batch's own time) stays within `budget_s` (0: no budget)."""
        msgs = self.consumer.consume(max_size, 0)
        if not msgs:
            msgs = self.consumer.consume(1, block_s)
            if msgs and max_size > 1:
                wait = linger_s(max_wait_s, budget_s, _age_s(msgs[0]), cost_s) if budget_s > 0 else max_wait_s
                msgs += self.consumer.consume(max_size - 1, wait)
        good = []
        for m in msgs:
            err = m.error()
            if err is None:
                good.append(m)
            elif err.fatal() or err.code() == KafkaError._FATAL:
                # For example a static member back before its session expired (consumer protocol, KIP-848): the
                # broker refuses its instance id; a restart after the session timeout rejoins.
                raise KafkaFatal(f"consumer error: {err.str()}")
            else:
                get_logger("worker").warning("consumer_error", error=err.str())
        return good

    def rewind(self, topic: str, partitions: set[int]) -> list[int]:
        """Seek these assigned partitions of `topic` to their beginning; return those it could seek."""
        done = []
        for tp in self.consumer.assignment():
            if tp.topic == topic and tp.partition in partitions:
                try:
                    self.consumer.seek(TopicPartition(topic, tp.partition, OFFSET_BEGINNING))
                    done.append(tp.partition)
                except KafkaException:
                    pass  # not fetching yet: librdkafka resets an out-of-range position to the earliest
        return done

    def hold(self, msgs: list[Message]) -> None:
        """Pause every assigned partition and seek those of `msgs` back to their first offset there."""
        self.consumer.pause(self.consumer.assignment())
        first: dict[TP, int] = {}
        for m in msgs:
            first.setdefault((m.topic(), m.partition()), m.offset())
        self.seek(first)

    def seek(self, positions: dict[TP, int]) -> None:
        """Fetch these partitions again from these offsets; raise KafkaFatal if one cannot be sought."""
        for (topic, partition), offset in positions.items():
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:
                # Going on would skip these records.
                raise KafkaFatal(f"cannot seek {topic}[{partition}] back to {offset}: {exc.args[0].str()}") from None

    def release(self) -> None:
        """Resume every assigned partition."""
        self.consumer.resume(self.consumer.assignment())

    def batch_budget_s(self) -> float:
        """How long one batch may take: before the group evicts this member (max.poll.interval.ms), or, with
        exactly-once, before the coordinator aborts the open transaction and fences the producer."""
        budget = int(consumer_config(self.settings).get("max.poll.interval.ms", 300_000)) / 1000.0
        if self.transactional:
            budget = min(budget, self.settings.transaction_timeout_ms() / 1000.0)
        return budget

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        on_delivery: Callable,
        headers: Headers | None = None,
        timestamp: int = 0,
        alone: bool = False,
    ) -> None:
        """Queue one record (`alone`: in a produce request of its own); a full queue waits for room.

        Raises Refused when librdkafka refuses this record itself, KafkaFatal when the topic is unusable, and
        Interrupted when the worker stops or fails while waiting for room.
        """
        alone = alone and not self.transactional  # a transaction's records are probed alone instead (probe())
        if alone and self._single is None:
            self._single = Producer(self._single_config)
        producer = self._single if alone else self.producer
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=on_delivery, headers=headers, timestamp=timestamp)
                if self.one_at_a_time:
                    producer.flush()
                return
            except BufferError:
                self._wait_for_room(producer, topic)
            except KafkaException as exc:
                self._refused(topic, exc.args[0])
                raise Refused(exc.args[0]) from None

    def produce_all(self, topic: str, keys: list[bytes | None], values: list[bytes],
                    on_delivery: Callable[[int, KafkaError | None], None],
                    refused: Callable[[int, KafkaError], None]) -> None:
        """Queue record i of many, reported by `on_delivery(i, err)`; one librdkafka refuses goes to `refused(i, err)`."""
        produce = self.producer.produce
        callbacks = self._slots.claim(on_delivery, len(values))
        if self.one_at_a_time:
            self.producer.flush()
            for i, (key, value, callback) in enumerate(zip(keys, values, callbacks)):
                try:
                    self.produce(topic, key, value, callback)
                except Refused as exc:
                    refused(i, exc.error)
            return
        for i, (key, value, callback) in enumerate(zip(keys, values, callbacks)):
            try:
                # Positional (partition -1: the partitioner's choice): librdkafka's keyword parsing costs a third more.
                produce(topic, value, key, -1, callback)
            except BufferError:
                try:
                    self.produce(topic, key, value, callback)
                except Refused as exc:
                    refused(i, exc.error)
            except KafkaException as exc:
                self._refused(topic, exc.args[0])
                refused(i, exc.args[0])

    def _refused(self, topic: str, err: KafkaError) -> None:
        """Return if produce() refused the record itself; else raise Aborting or KafkaFatal."""
        if err.code() in RECORD_ERRORS:
            return
        if self.transactional and err.code() == KafkaError._STATE:
            raise Aborting(err.str())
        if err.code() == KafkaError._FATAL:
            self.producer.poll(0)  # error_cb names the cause (fenced by a newer instance, a transaction timed out)
            raise KafkaFatal(f"the producer failed fatally and cannot go on: {err.str()}")
        raise KafkaFatal(f"cannot produce to {topic}: {err.str()}")

    def _wait_for_room(self, producer: Producer, topic: str) -> None:
        producer.poll(0.05)
        if self.failed():
            raise KafkaFatal(f"output not acknowledged while producing to {topic}")
        if self.stopping():
            raise Interrupted

    def serve_deliveries(self, timeout: float = 0) -> None:
        """Run pending delivery callbacks."""
        self.producer.poll(timeout)
        if self._single is not None:
            self._single.poll(0)

    def flush(self, timeout: float) -> int:
        """Wait for every queued record's acknowledgement; return how many are still outstanding."""
        deadline = time.monotonic() + timeout
        remaining = self.producer.flush(timeout)
        if self._single is not None:
            remaining += self._single.flush(max(0.0, deadline - time.monotonic()))
        return remaining

    def init_transactions(self, timeout: float) -> None:
        """Register the transactional.id; aborts the open transaction of a predecessor with the same id."""
        self.producer.init_transactions(timeout)

    def begin_transaction(self) -> None:
        """Open a transaction if none is open."""
        if not self.in_transaction:
            self.producer.begin_transaction()
            self.in_transaction = True

    def send_offsets(self, positions: dict[TP, int], timeout: float) -> None:
        """Add the consumed positions to the open transaction; raises KafkaException.

        The group metadata lets the coordinator refuse the offsets of a member that lost its partitions (KIP-447).
        """
        if positions:
            self.producer.send_offsets_to_transaction(
                [TopicPartition(t, p, o) for (t, p), o in positions.items()], self.consumer.consumer_group_metadata(),
                timeout)

    def commit_transaction(self, timeout: float) -> None:
        """Commit the open transaction; raises KafkaException."""
        self.producer.commit_transaction(timeout)
        self.in_transaction = False

    def abort_transaction(self, timeout: float) -> None:
        """Abort the open transaction; librdkafka fails its unsent records with _PURGE_QUEUE. Raises KafkaException."""
        self.producer.abort_transaction(timeout)
        self.in_transaction = False

    def probe(self, records: list[tuple], timeout: float) -> list[KafkaError | None]:
        """Why each (topic, key, value, headers, timestamp) is refused, or None: sent in a transaction then aborted.

        Records the broker fails together (one produce batch) are all reported refused. A record not sent because an
        earlier one failed the transaction is reported with librdkafka's _PURGE_QUEUE (no answer on it). Raises
        KafkaException when no record got an answer (a refusal leaves a gap in the producer's sequence numbers; the
        epoch bump that repairs it can purge the next probe whole).
        """
        reports: list[KafkaError | None | bool] = [False] * len(records)

        def report(i: int, err: KafkaError | None, _msg) -> None:
            reports[i] = err

        self.begin_transaction()
        for i, (topic, key, value, headers, timestamp) in enumerate(records):
            try:
                self.producer.produce(topic, value, key, headers=headers, timestamp=timestamp,
                                      on_delivery=partial(report, i))
            except KafkaException as exc:
                if exc.args[0].code() not in RECORD_ERRORS:
                    raise
                reports[i] = exc.args[0]
        self.producer.flush(timeout)
        self.abort_transaction(timeout)
        if any(r is False for r in reports):
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "no delivery report for a probe"))
        if all(r is not None and r.code() not in RECORD_ERRORS for r in reports):
            raise KafkaException(reports[0])
        return reports

    def commit(self, positions: dict[TP, int], asynchronous: bool) -> None:
        """Commit the given next-offsets."""
        if positions:
            done = self.consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in positions.items()], asynchronous=asynchronous
            )
            failed = _first_error(done or [])
            if failed is not None:  # a synchronous commit reports a partition's own failure only here
                raise KafkaException(failed)

    def lag(self) -> dict[TP, int]:
        """Messages between the consumer's position and the end of each assigned partition."""
        out = {}
        assigned = self.consumer.assignment()
        for tp in self.consumer.position(assigned) if assigned else []:
            low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0:
                out[(tp.topic, tp.partition)] = max(0, high - (tp.offset if tp.offset >= 0 else low))
        return out

    def close(self, timeout: float | None = None) -> bool:
        """Leave the group and close the consumer, within `timeout` seconds if given; False if it did not finish.

        librdkafka's close has no timeout of its own (it waits for the coordinator while the broker is away), so with
        a timeout it runs in a daemon thread that the process may leave behind. The producers are closed by garbage
        collection.
        """
        if timeout is None:
            self.consumer.close()
            return True
        # The revoke callback runs in that thread; its log lines keep the caller's bound context (worker_id, group).
        context = contextvars.copy_context()
        closer = threading.Thread(target=context.run, args=(self.consumer.close,), name="consumer-close", daemon=True)
        closer.start()
        closer.join(timeout)
        return not closer.is_alive()


class TopicWatch:
    """A daemon thread that describes one topic every `interval_s`: is it there, and under which topic id.

    Deleting and re-creating a topic does not reach a consumer as an error (librdkafka only resets an out-of-range
    position), so the worker watches the topic id to notice both.
    """

    def __init__(self, conf: dict, topic: str, interval_s: float = 2.0):
        self.topic, self.interval_s = topic, interval_s
        self.present: bool | None = None  # None until the first answer
        self.topic_id: str | None = None
        self.generation = 0  # bumped whenever `present` or `topic_id` changes
        self.answered_at = 0.0  # time.monotonic() of the cluster's last answer
        self._client = admin(conf)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{topic}", daemon=True)

    def start(self) -> TopicWatch:
        """Start watching."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop watching (the thread exits within one request timeout)."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            present, topic_id = self._describe()
            if present is not None:
                self.answered_at = time.monotonic()
            if present is not None and (present, topic_id) != (self.present, self.topic_id):
                self.present, self.topic_id = present, topic_id
                self.generation += 1
            self._stop.wait(self.interval_s)

    def _describe(self) -> tuple[bool | None, str | None]:
        future = self._client.describe_topics(TopicCollection([self.topic]), request_timeout=5)[self.topic]
        try:
            return True, str(future.result().topic_id)
        except KafkaException as exc:
            code = exc.args[0].code()
            return (False, None) if code == KafkaError.UNKNOWN_TOPIC_OR_PART else (None, None)


def answers(bootstrap: str, timeout: float = 1.0) -> bool:
    """Whether a PLAINTEXT broker at `bootstrap` answers a metadata request."""
    try:
        admin({"bootstrap.servers": bootstrap, "log_level": 0}).list_topics(timeout=timeout)
        return True
    except KafkaException:
        return False


@dataclass(frozen=True)
class Record:
    """A record read back from a topic (by tools, tests and the chaos audit)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    timestamp_ms: int


def send(producer: Producer, topic: str, value: bytes | None, key: bytes | None,
         give_up: Callable[[], bool] = lambda: False, **kwargs) -> None:
    """Produce one record; while librdkafka's queue is full, serve deliveries until there is room."""
    while True:
        try:
            producer.produce(topic, value, key, **kwargs)
            return
        except BufferError:
            producer.poll(0.05)
            if give_up():
                raise KafkaFatal(f"output not acknowledged while producing to {topic}") from None


def plain_producer(conf: dict, **extra) -> Producer:
    """An idempotent producer for tools and sample traffic."""
    return Producer({"logger": QUIET_LOG, **conf, "enable.idempotence": True, "linger.ms": 5, **extra})


def iter_topic(conf: dict, topic: str, idle_s: float) -> Iterator[Record | None]:
    """Yield a topic's records from the start, and None on each empty poll, until idle for `idle_s`."""
    consumer = Consumer({"logger": QUIET_LOG, **conf, "group.id": f"reader-{uuid.uuid4().hex}", "auto.offset.reset": "earliest",
                         "enable.auto.commit": False})
    consumer.subscribe([topic])
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle_s:
            # consume(n, timeout) waits for n messages or the timeout: take what is there, else block for one.
            msgs = consumer.consume(1000, 0) or consumer.consume(1, 0.2)
            msgs = [m for m in msgs if m.error() is None]
            if not msgs:
                yield None
            for m in msgs:
                last = time.monotonic()
                yield Record(m.partition(), m.offset(), m.key(), m.value(), dict(m.headers() or []), m.timestamp()[1])
    finally:
        consumer.close()


def read_topic(conf: dict, topic: str, expected: int, timeout: float = 120.0, idle_s: float = 5.0) -> list[Record]:
    """Read a topic from the start until `expected` records arrived, or it stayed idle past the timeout."""
    out: list[Record] = []
    deadline = time.monotonic() + timeout
    for record in iter_topic(conf, topic, idle_s=timeout + idle_s):
        if record is not None:
            out.append(record)
            if len(out) == expected:
                # Linger briefly so that extra (duplicate) records are read too.
                deadline = min(deadline, time.monotonic() + 1.0)
        if time.monotonic() > deadline:
            break
    return out


def end_offsets(conf: dict, topic: str) -> dict[int, int]:
    """The high watermark of each partition of a topic."""
    consumer = Consumer({"logger": QUIET_LOG, **conf, "group.id": "offset-probe"})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    finally:
        consumer.close()


_COORDINATOR_MOVING = frozenset({KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                                 KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError._TIMED_OUT})


def coordinator_moving(exc: KafkaException) -> bool:
    """Whether a failed group request may succeed if asked again: a coordinator loading or moving, or retriable."""
    err = exc.args[0]
    return err.code() in _COORDINATOR_MOVING or err.retriable()


def committed_offsets(conf: dict, group: str, topic: str) -> dict[int, int]:
    """A group's committed offset for each partition of a topic (-1001 when none)."""
    consumer = Consumer({"logger": QUIET_LOG, **conf, "group.id": group})
    deadline = time.monotonic() + 30
    try:
        parts = [TopicPartition(topic, p) for p in end_offsets(conf, topic)]
        while True:
            try:
                found = consumer.committed(parts, timeout=10)
                # A partition's own error (its coordinator still loading, say) comes with offset -1001: not "none".
                failed = _first_error(found)
                if failed is not None:
                    raise KafkaException(failed)
                return {tp.partition: tp.offset for tp in found}
            except KafkaException as exc:  # a broker that just started is still loading its coordinators
                if not coordinator_moving(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        consumer.close()


def _acls(topic: str, filter_: bool = False) -> list:
    cls = AclBindingFilter if filter_ else AclBinding
    # Once a topic has any ACL, "allow everyone if no ACL found" stops applying to it, hence the explicit ALLOW.
    return [cls(ResourceType.TOPIC, topic, ResourcePatternType.LITERAL, "User:ANONYMOUS", "*", op, permission)
            for op, permission in ((AclOperation.ALL, AclPermissionType.ALLOW), (AclOperation.WRITE, AclPermissionType.DENY))]


def set_topic_writable(conf: dict, topic: str, writable: bool, timeout: float = 30.0) -> None:
    """Add or remove a DENY WRITE ACL for anonymous clients on a topic (a fault for the chaos harness)."""
    client = admin(conf)
    futures = (client.delete_acls(_acls(topic, True), request_timeout=timeout) if writable
               else client.create_acls(_acls(topic), request_timeout=timeout))
    for future in futures.values():
        future.result()


def wait_for_broker(conf: dict, timeout: float) -> None:
    """Block until the cluster answers a metadata request, or raise KafkaFatal."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            admin(conf).list_topics(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            return
        except KafkaException as exc:
            last = exc.args[0].str()
    raise KafkaFatal(f"Kafka at {conf.get('bootstrap.servers')} did not answer within {timeout:.0f}s: {last}")


def linger_s(max_wait_s: float, budget_s: float, age_s: float, cost_s: float) -> float:
    """Seconds to wait for more records after a batch's first: `max_wait_s`, or less when the first record, `age_s`
    old, would otherwise leave the latency budget `budget_s` (0: none) before its batch's `cost_s` is spent."""
    if budget_s <= 0:
        return max_wait_s
    return max(0.0, min(max_wait_s, budget_s - max(0.0, age_s) - cost_s))


def _age_s(m: Message) -> float:
    """Seconds since the record's timestamp (0 when it has none)."""
    kind, ms = m.timestamp()
    return time.time() - ms / 1000.0 if kind != TIMESTAMP_NOT_AVAILABLE and ms > 0 else 0.0


def _first_error(parts: list[TopicPartition]) -> KafkaError | None:
    """The first partition's own error: librdkafka reports a partition's failure (a coordinator still loading, say)
    in its TopicPartition.error, possibly with no error for the request as a whole."""
    return next((p.error for p in parts if p.error is not None), None)


def _commit_result(err: KafkaError | None, parts: list[TopicPartition]) -> tuple[KafkaError | None, dict[TP, int]]:
    """A commit's error and the positions it concerns: those of the partitions that failed, when only some did."""
    failed = [p for p in parts if p.error is not None]
    return err or _first_error(parts), {(p.topic, p.partition): p.offset for p in (failed or parts)}


class ShadowOutput:
    """A challenger's verdicts: a producer of its own, outside the worker's offsets and transactions."""

    def __init__(self, settings: Settings, topic: str, failed: Callable[[str], None]):
        conf = {k: v for k, v in producer_config(settings).items() if not k.startswith("transaction")}
        # A shadow verdict that cannot land is counted within 30 s, not after librdkafka's default 5 minutes.
        self.producer = Producer({**conf, "delivery.timeout.ms": 30_000, "logger": QUIET_LOG,
                                  "error_cb": lambda err: failed(err.str())})
        self.topic = topic
        self._failed = failed

    def send(self, keys: list[bytes | None], values: list[bytes]) -> None:
        """Produce one shadow verdict per key; a refusal, here or in its delivery report, is passed to `failed`."""
        for key, value in zip(keys, values):
            try:
                self.producer.produce(self.topic, value, key, on_delivery=self._delivered)
            except (BufferError, KafkaException) as exc:
                self._failed(str(exc))
        self.producer.poll(0)

    def _delivered(self, err: KafkaError | None, _msg) -> None:
        if err is not None:
            self._failed(err.str())

    def close(self, timeout: float) -> None:
        """Deliver what is queued within `timeout` seconds."""
        self.producer.flush(timeout)
