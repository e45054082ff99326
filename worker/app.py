"""The worker loop: poll a batch, score it, publish verdicts and dead letters, commit what is acknowledged."""

from __future__ import annotations

import threading
import time
from functools import partial

from confluent_kafka import KafkaError, KafkaException

from .codec import Codec
from .kafka import RECORD_ERRORS, KafkaFatal, KafkaIO, describe_topics, client_config
from .logs import get_logger
from .metrics import Health, Metrics
from .offsets import OffsetTracker, Slice
from .offsets import TopicPartition as TP
from .records import BatchOutcome, DeadLetter, Message, Stage, dead_letter_headers
from .scoring import Scorer, score_batch
from .settings import Settings

log = get_logger("worker")
_LAG_INTERVAL_S = 5.0
_POLL_BLOCK_S = 0.5


class _Ticket:
    """One batch's outputs awaiting acknowledgement; when the last arrives, its slices are acknowledged at once."""

    __slots__ = ("worker", "outcome", "slices", "outstanding", "refused", "dead_letter_stages", "_index")

    def __init__(self, worker: Worker, outcome: BatchOutcome, slices: list[Slice]):
        self.worker, self.outcome, self.slices = worker, outcome, slices
        self.outstanding = len(outcome.scored) + len(outcome.dead_letters)
        self.refused: set[int] = set()
        self.dead_letter_stages: list[str] = []
        self._index: dict[bytes, list[int]] | None = None

    def verdict_delivered(self, err: KafkaError | None, produced) -> None:
        """librdkafka's delivery report for one verdict (one bound method per batch, no per-message closure)."""
        if err is None:
            self.acked()
        else:
            self.worker._verdict_refused(self, self._position(produced.value()), err)

    def acked(self) -> None:
        """One output of the batch was acknowledged."""
        self.outstanding -= 1
        if self.outstanding == 0:
            self.worker._batch_acked(self)

    def _position(self, value: bytes) -> int:
        if self._index is None:
            self._index = {}
            for i, v in enumerate(self.outcome.encoded):
                self._index.setdefault(v, []).append(i)
        return self._index[value].pop()


class StartupError(RuntimeError):
    """The worker cannot start; nothing was consumed."""


class Worker:
    """One replica: owns a consumer, a producer, the offset tracker and the scorer it was given."""

    def __init__(
        self,
        settings: Settings,
        scorer: Scorer,
        codec: Codec | None = None,
        stop: threading.Event | None = None,
        metrics: Metrics | None = None,
        health: Health | None = None,
    ):
        self.settings = settings
        self.scorer = scorer
        self.codec = codec or Codec(max_message_bytes=settings.max_message_bytes)
        self.stop = stop or threading.Event()
        self.metrics = metrics or Metrics()
        self.health = health or Health(settings.health_timeout_s)
        self.tracker = OffsetTracker()
        self.fatal: str | None = None
        self._redo: list[tuple[_Ticket, DeadLetter, bool]] = []
        self._auth_error: str | None = None
        self._assigned: set[TP] = set()
        self._revocations = 0
        self.kafka: KafkaIO | None = None
        m = scorer.manifest
        self.metrics.model.info({"name": m.name, "version": m.version, "sha256": m.sha256})
        self.health.model_loaded = True

    def check_topics(self) -> None:
        """Fail start-up with one clear line if the broker is unreachable or a topic is missing."""
        s = self.settings
        conf = {**client_config(s), "error_cb": self._on_error}
        topics = (s.input_topic, s.verdict_topic, s.dead_letter_topic)
        deadline = time.monotonic() + s.startup_timeout_s
        while True:
            try:
                found = describe_topics(conf, topics, max(1.0, deadline - time.monotonic()),
                                        stop_early=lambda: self._auth_error is not None)
            except KafkaFatal as exc:
                raise StartupError(self._auth_error or str(exc)) from None
            if self._auth_error:
                raise StartupError(self._auth_error)
            missing = [t for t in topics if t not in found]
            # A broker that has just restarted may not know every topic yet.
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        if missing:
            raise StartupError(f"topic(s) {', '.join(missing)} do not exist on {s.bootstrap_servers}; create them with `fraud-worker topics`")
        self.health.broker_reachable = True

    def run(self) -> int:
        """Run until the stop event is set (exit code 0) or a fatal error (exit code 1)."""
        self.check_topics()
        s = self.settings
        if self.stop.is_set():
            return 0
        self.kafka = KafkaIO(s, self._on_assign, self._on_revoke, self._on_error, self._on_commit,
                             failed=lambda: self.fatal is not None)
        self._batch_limit = s.batch_max_size
        budget = self.kafka.max_poll_interval_s()
        self.kafka.subscribe()
        log.info("worker_started", input=s.input_topic, model=self.scorer.manifest.name,
                 model_version=self.scorer.manifest.version, batch_max_size=s.batch_max_size)
        last_commit, last_lag = time.monotonic(), 0.0
        commit_every = s.commit_interval_ms / 1000.0
        try:
            while not self.stop.is_set() and self.fatal is None:
                self.health.beat()
                revocations = self._revocations
                msgs = self.kafka.poll_batch(self._batch_limit, s.batch_max_wait_ms / 1000.0, _POLL_BLOCK_S)
                if revocations != self._revocations:
                    # consume() can return messages fetched before a revoke it ran; their new owner scores them.
                    msgs = [m for m in msgs if (m.topic(), m.partition()) in self._assigned]
                if msgs:
                    self._adapt_batch_limit(self._process(msgs), budget)
                self.kafka.serve_deliveries(0)
                self._produce_redo()
                now = time.monotonic()
                if now - last_commit >= commit_every:
                    self._commit(asynchronous=True)
                    last_commit = now
                if now - last_lag >= _LAG_INTERVAL_S:
                    self._update_lag()
                    last_lag = now
        except KafkaFatal as exc:
            self._fail(str(exc))
        except Exception as exc:  # a bug must still stop cleanly: drain, commit only what is acknowledged
            log.exception("unexpected_error")
            self._fail(f"unexpected {type(exc).__name__}: {exc}")
        return self._shutdown()

    def _adapt_batch_limit(self, seconds: float, budget: float) -> None:
        """Halve the batch when one took over a third of max.poll.interval.ms, so a slow model cannot livelock the group."""
        if seconds > budget / 3 and self._batch_limit > 1:
            self._batch_limit = max(1, self._batch_limit // 2)
            log.warning("batch_limit_lowered", seconds=round(seconds, 3), batch_limit=self._batch_limit,
                        max_poll_interval_s=budget)
        elif seconds < budget / 20 and self._batch_limit < self.settings.batch_max_size:
            self._batch_limit = min(self.settings.batch_max_size, self._batch_limit * 2)

    def _process(self, msgs: list[Message]) -> float:
        t0 = time.perf_counter()
        outcome = score_batch(msgs, self.scorer, self.codec, int(time.time() * 1000))
        last: dict[int, int] = {}
        for m in msgs:
            last[m.partition()] = m.offset()
        topic = self.settings.input_topic
        ticket = _Ticket(self, outcome, [self.tracker.open((topic, p), offset, 1) for p, offset in last.items()])
        self.kafka.produce_all(self.settings.verdict_topic, [m.key() for m in outcome.scored], outcome.encoded,
                               ticket.verdict_delivered)
        for dl in outcome.dead_letters:
            self._produce_dead_letter(ticket, dl)
        seconds = time.perf_counter() - t0
        self.metrics.consumed.inc(len(msgs))
        self.metrics.batch_size.observe(len(msgs))
        self.metrics.inference.observe(seconds)
        log.info("batch_scored", size=len(msgs), verdicts=len(outcome.scored),
                 dead_letters=len(outcome.dead_letters), ms=round(seconds * 1000, 2))
        return seconds

    def _produce_dead_letter(self, ticket: _Ticket, dl: DeadLetter, stripped: bool = False) -> None:
        msg = dl.message
        now_ms = int(time.time() * 1000)
        headers = dead_letter_headers(dl, self.settings.group_id, self.settings.worker_id, now_ms)
        value = msg.value()
        if stripped:
            # The original did not fit on the dead-letter topic; keep the reason and the coordinates at least.
            headers = [h for h in headers if h[0].startswith("fraud.errors.")] + [("fraud.errors.original.dropped", b"true")]
            value = None
        ts_type, ts = msg.timestamp()
        self.kafka.produce(
            self.settings.dead_letter_topic, msg.key(), value,
            partial(self._dead_letter_delivered, ticket, dl, stripped), headers=headers,
            timestamp=ts if ts_type else 0,
        )

    def _verdict_refused(self, ticket: _Ticket, i: int, err: KafkaError) -> None:
        msg = ticket.outcome.scored[i]
        if err.code() in RECORD_ERRORS:
            ticket.refused.add(i)
            self._redo.append((ticket, DeadLetter(msg, Stage.PRODUCE, "KafkaError", err.str()), False))
        else:
            self._fail(f"verdict for {msg.topic()}[{msg.partition()}]@{msg.offset()} not acknowledged: {err.str()}")

    def _dead_letter_delivered(self, ticket: _Ticket, dl: DeadLetter, stripped: bool,
                               err: KafkaError | None, _produced) -> None:
        if err is None:
            ticket.dead_letter_stages.append(dl.stage.value)
            ticket.acked()
        elif err.code() in RECORD_ERRORS and not stripped:
            self._redo.append((ticket, dl, True))
        else:
            m = dl.message
            self._fail(f"dead letter for {m.topic()}[{m.partition()}]@{m.offset()} not acknowledged: {err.str()}")

    def _batch_acked(self, ticket: _Ticket) -> None:
        for s in ticket.slices:
            self.tracker.ack(s)
        self.metrics.batch_acked(ticket.outcome, ticket.refused, ticket.dead_letter_stages, time.time())

    def _produce_redo(self) -> None:
        while self._redo and self.fatal is None:
            ticket, dl, stripped = self._redo.pop(0)
            self._produce_dead_letter(ticket, dl, stripped)

    def _drain(self, timeout: float) -> int:
        """Flush until every output is acknowledged (re-producing refused records as dead letters) or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = self.kafka.flush(max(0.0, deadline - time.monotonic()))
            if not self._redo or self.fatal is not None or time.monotonic() >= deadline:
                return remaining + len(self._redo)
            self._produce_redo()

    def _commit(self, asynchronous: bool, tps: set[TP] | None = None) -> None:
        if asynchronous:
            positions = self.tracker.to_commit(tps)
        else:
            # A final commit resends every safe position: an earlier async commit of it may still fail.
            positions = {tp: pos for tp, pos in self.tracker.safe_positions().items() if tps is None or tp in tps}
        if not positions:
            return
        try:
            self.kafka.commit(positions, asynchronous=asynchronous)
            self.metrics.commits.inc()
        except KafkaException as exc:
            self.tracker.uncommit(positions)
            self.metrics.commit_failures.inc()
            log.warning("commit_failed", error=exc.args[0].str(), partitions=len(positions), sync=not asynchronous)

    def _on_commit(self, err: KafkaError | None, positions: dict[TP, int]) -> None:
        if err is not None and err.code() != KafkaError._NO_OFFSET:
            self.tracker.uncommit(positions)
            self.metrics.commit_failures.inc()
            log.warning("commit_failed", error=err.str(), partitions=len(positions))
        elif err is None:
            self.health.broker_reachable = True

    def _on_assign(self, tps: set[TP]) -> None:
        self._assigned |= tps
        self.health.in_group = True
        self.metrics.assigned.set(len(self._assigned))
        log.info("partitions_assigned", partitions=sorted(p for _, p in tps), total=len(self._assigned))

    def _on_revoke(self, tps: set[TP], lost: bool) -> None:
        if not lost and self.fatal is None:
            remaining = self._drain(self.settings.shutdown_timeout_s)
            self._commit(asynchronous=False, tps=tps)
            if remaining:
                log.warning("revoke_with_unacknowledged_output", outstanding=remaining)
        self.tracker.forget(tps)
        self._assigned -= tps
        self._revocations += 1
        for topic, partition in tps:
            try:
                self.metrics.lag.remove(topic, str(partition))
            except KeyError:
                pass
        self.metrics.assigned.set(len(self._assigned))
        log.info("partitions_lost" if lost else "partitions_revoked", partitions=sorted(p for _, p in tps))

    def _update_lag(self) -> None:
        try:
            for (topic, partition), lag in self.kafka.lag().items():
                self.metrics.lag.labels(topic, str(partition)).set(lag)
        except KafkaException as exc:
            log.warning("lag_unavailable", error=exc.args[0].str())

    def _on_error(self, err: KafkaError) -> None:
        code = err.code()
        if code in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
            self._auth_error = f"Kafka authentication failed: {err.str()}"
            self._fail(self._auth_error)
        elif err.fatal():
            self._fail(f"fatal Kafka error: {err.str()}")
        elif code == KafkaError._ALL_BROKERS_DOWN:
            self.health.broker_reachable = False
            log.warning("brokers_down", error=err.str())
        else:
            log.warning("kafka_error", error=err.str())

    def _fail(self, reason: str) -> None:
        if self.fatal is None:
            self.fatal = reason
            log.error("worker_failed", reason=reason)

    def _shutdown(self) -> int:
        outstanding = self._drain(self.settings.shutdown_timeout_s) if self.kafka else 0
        if self.kafka:
            self._commit(asynchronous=False)
            self.kafka.close()
        log.info("worker_stopped", reason=self.fatal or "stop requested", unacknowledged=outstanding)
        return 1 if self.fatal else 0
