"""The only confluent_kafka user: client configs, batch polling, producing, commits, rebalances, topics."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

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
        **settings.producer_config,
    }


def admin(conf: dict) -> AdminClient:
    """An AdminClient for the given client config."""
    return AdminClient(conf)


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


def describe_topics(conf: dict, topics: Iterable[str], timeout: float) -> dict[str, int]:
    """Partition count per existing topic; raise KafkaFatal if the broker cannot be reached."""
    try:
        md = admin(conf).list_topics(timeout=timeout)
    except KafkaException as exc:
        raise KafkaFatal(f"cannot reach Kafka at {conf['bootstrap.servers']} within {timeout:g}s: {exc.args[0].str()}") from None
    return {t: len(md.topics[t].partitions) for t in topics if t in md.topics and md.topics[t].error is None}


class KafkaIO:
    """One consumer and one producer, wrapped so the loop sees only plain calls."""

    def __init__(
        self,
        settings: Settings,
        on_assign: Callable[[set[TP]], None],
        on_revoke: Callable[[set[TP], bool], None],
        on_error: Callable[[KafkaError], None],
        on_commit: Callable[[KafkaError | None, dict[TP, int]], None],
    ):
        self.settings = settings
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
        return good

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        on_delivery: Callable,
        headers: Headers | None = None,
        timestamp: int = 0,
    ) -> None:
        """Queue one record; when librdkafka's queue is full, serve deliveries until there is room."""
        while True:
            try:
                self.producer.produce(topic, value, key, headers=headers, timestamp=timestamp, on_delivery=on_delivery)
                return
            except BufferError:
                self.producer.poll(0.05)

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
