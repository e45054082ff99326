"""The only confluent_kafka user: client configs, batch polling, producing, commits, rebalances, topics."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import (
    AclBinding, AclBindingFilter, AclOperation, AclPermissionType, AdminClient, NewTopic, ResourcePatternType,
    ResourceType,
)

from .logs import get_logger
from .offsets import TopicPartition as TP
from .records import Headers, Message
from .settings import Settings

# Per-message produce errors: the record itself is refused, so it can be dead-lettered and the stream go on.
RECORD_ERRORS = frozenset(
    {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD, KafkaError.INVALID_MSG_SIZE, KafkaError.RECORD_LIST_TOO_LARGE}
)


class KafkaFatal(RuntimeError):
    """The shell cannot go on: the broker or a topic is unusable."""


class _ToStructlog(logging.Handler):
    """Forwards librdkafka's log lines to structlog, so stdout stays JSON and stderr stays quiet."""

    def emit(self, record: logging.LogRecord) -> None:
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
        **settings.security_config(),
    }


def consumer_config(settings: Settings) -> dict:
    """The consumer: manual commits only, cooperative rebalancing, bounded fetches."""
    return {
        **client_config(settings),
        "group.id": settings.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "enable.partition.eof": False,
        "message.max.bytes": max(settings.max_message_bytes * 2, 1_000_000),
        # librdkafka prefetches up to 64 MiB per consumer by default; 16 MiB keeps memory flat and is plenty.
        "queued.max.messages.kbytes": 16384,
        **settings.consumer_config,
    }


def producer_config(settings: Settings) -> dict:
    """The producer: idempotent, acks=all, a short linger for batching."""
    return {
        **client_config(settings),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        # Unacknowledged output may otherwise grow to 1 GiB while the broker is slow or away.
        "queue.buffering.max.kbytes": 65536,
        **settings.producer_config,
    }


def admin(conf: dict) -> AdminClient:
    """An AdminClient for the given client config."""
    return AdminClient({"logger": QUIET_LOG, **conf})


def create_topics(conf: dict, partitions: dict[str, int], replication: int = 1, timeout: float = 30.0) -> list[str]:
    """Create topics that do not exist yet; return those created."""
    client = admin(conf)
    existing = set(client.list_topics(timeout=timeout).topics)
    wanted = [NewTopic(t, num_partitions=n, replication_factor=replication) for t, n in partitions.items() if t not in existing]
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
    ):
        self.settings = settings
        self.failed = failed
        self._on_assign, self._on_revoke = on_assign, on_revoke
        common = {"error_cb": on_error}
        self.producer = Producer({**producer_config(settings), **common})
        self.consumer = Consumer(
            {
                **consumer_config(settings),
                **common,
                "on_commit": lambda err, parts: on_commit(err, {(p.topic, p.partition): p.offset for p in parts}),
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

    def poll_batch(self, max_size: int, max_wait_s: float, block_s: float) -> list[Message]:
        """Whatever is already fetched (up to max_size); else block for one and linger max_wait_s for more."""
        msgs = self.consumer.consume(max_size, 0)
        if not msgs:
            msgs = self.consumer.consume(1, block_s)
            if msgs and max_size > 1:
                msgs += self.consumer.consume(max_size - 1, max_wait_s)
        good = []
        for m in msgs:
            err = m.error()
            if err is None:
                good.append(m)
            elif err.fatal():
                raise KafkaFatal(f"consumer error: {err.str()}")
            else:
                get_logger("worker").warning("consumer_error", error=err.str())
        return good

    def max_poll_interval_s(self) -> float:
        """How long the loop may spend between polls before the group evicts this member."""
        return int(consumer_config(self.settings).get("max.poll.interval.ms", 300_000)) / 1000.0

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        on_delivery: Callable,
        headers: Headers | None = None,
        timestamp: int = 0,
    ) -> None:
        """Queue one record; a full queue waits for room, a refused topic is fatal."""
        try:
            send(self.producer, topic, value, key, self.failed, headers=headers, timestamp=timestamp,
                 on_delivery=on_delivery)
        except KafkaException as exc:
            raise KafkaFatal(f"cannot produce to {topic}: {exc.args[0].str()}") from None

    def produce_all(self, topic: str, keys: list[bytes | None], values: list[bytes], on_delivery: Callable) -> None:
        """Queue many records with one delivery callback; the hot path, so librdkafka is called directly."""
        produce = self.producer.produce
        for key, value in zip(keys, values):
            try:
                produce(topic, value, key, on_delivery=on_delivery)
            except BufferError:
                self.produce(topic, key, value, on_delivery)
            except KafkaException as exc:
                raise KafkaFatal(f"cannot produce to {topic}: {exc.args[0].str()}") from None

    def serve_deliveries(self, timeout: float = 0) -> None:
        """Run pending delivery callbacks."""
        self.producer.poll(timeout)

    def flush(self, timeout: float) -> int:
        """Wait for every queued record's acknowledgement; return how many are still outstanding."""
        return self.producer.flush(timeout)

    def commit(self, positions: dict[TP, int], asynchronous: bool) -> None:
        """Commit the given next-offsets."""
        if positions:
            self.consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in positions.items()], asynchronous=asynchronous
            )

    def lag(self) -> dict[TP, int]:
        """Messages between the consumer's position and the end of each assigned partition."""
        out = {}
        assigned = self.consumer.assignment()
        for tp in self.consumer.position(assigned) if assigned else []:
            low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0:
                out[(tp.topic, tp.partition)] = max(0, high - (tp.offset if tp.offset >= 0 else low))
        return out

    def close(self) -> None:
        """Leave the group and close the consumer (the producer is closed by garbage collection)."""
        self.consumer.close()


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


def committed_offsets(conf: dict, group: str, topic: str) -> dict[int, int]:
    """A group's committed offset for each partition of a topic (-1001 when none)."""
    consumer = Consumer({"logger": QUIET_LOG, **conf, "group.id": group})
    try:
        parts = [TopicPartition(topic, p) for p in end_offsets(conf, topic)]
        return {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=10)}
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
