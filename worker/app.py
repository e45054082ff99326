"""The worker loop: poll a batch, score it, publish verdicts and dead letters, commit what is acknowledged."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from enum import IntEnum
from functools import partial

from confluent_kafka import KafkaError, KafkaException

from .avro.codec import Codec
from .avro.recordcodec import RecordCodec, input_codec
from .avro.registry import FramedInput, RegistryUnavailable, connect, frame, register
from .kafka import (
    RECORD_ERRORS, Aborting, ConfigError, Interrupted, KafkaFatal, KafkaIO, Refused, ShadowOutput, TopicWatch,
    client_config, describe_topics, transactional_id,
)
from .logs import FirstSeen, get_logger
from .metrics import Health, Metrics
from .model.lifecycle import LoadedModel, Models
from .offsets import OffsetTracker, Slice
from .offsets import TopicPartition as TP
from .records import BatchOutcome, DeadLetter, Message, Stage, adjusted_dead_letter, dead_letter_headers
from .scoring import Scorer, score_batch
from .settings import Settings

log = get_logger("worker")
_LAG_INTERVAL_S = 5.0
_POLL_BLOCK_S = 0.5
_ACK_WAIT_S = 0.005
# Each client (consumer, producers) reports the same broker error on every reconnect; say it once per window.
_REPEAT_QUIET_S = 30.0
# Retries of a batch whose writer schema could not be fetched: first wait, longest wait (seconds).
_REGISTRY_BACKOFF_S = (1.0, 30.0)
# Delivery errors of records purged by our own abort_transaction().
_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})
# Delivery errors that no retry can fix: the worker stops loudly rather than abort transactions forever.
_DENIED = frozenset({KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED,
                     KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, KafkaError.UNKNOWN_TOPIC_OR_PART})
# Transactions aborted in a row for refusals that no record alone explains, before the worker gives up.
_INNOCENT_ROUNDS = 3
# Probes of one output that may end without the broker's answer on it, before the worker gives up.
_PROBE_ATTEMPTS = 8
# How long a transactional call may outlive its own timeout before the worker gives up on it (seconds).
_HUNG_S = 15.0
_SHADOW_FLUSH_S = 5.0


class _Ticket:
    """One batch's outputs awaiting acknowledgement; when the last arrives, its slices are acknowledged at once."""

    __slots__ = ("worker", "outcome", "slices", "outstanding", "refused", "dead_letter_stages", "void")

    def __init__(self, worker: Worker, outcome: BatchOutcome, slices: list[Slice]):
        self.worker, self.outcome, self.slices = worker, outcome, slices
        self.outstanding = len(outcome.scored) + len(outcome.dead_letters)
        self.refused: set[int] = set()
        self.dead_letter_stages: list[str] = []
        self.void = False  # its transaction was aborted: late reports change nothing

    def verdict_delivered(self, i: int, err: KafkaError | None) -> None:
        """librdkafka's delivery report for verdict i of the batch (i is its identity, never its bytes)."""
        if err is None:
            self.acked()
        else:
            self.worker._verdict_refused(self, i, err, alone=False)

    def acked(self) -> None:
        """One output of the batch was acknowledged."""
        self.outstanding -= 1
        if self.outstanding == 0 and not self.void:
            self.worker._batch_acked(self)


class _Progress:
    """Batches scored since the last `progress` line: one info line per interval, not one per batch."""

    def __init__(self) -> None:
        self._start(0.0)  # the first batch is reported at once

    def _start(self, now: float) -> None:
        self.since = now
        self.batches = self.consumed = self.verdicts = self.dead_letters = 0
        self.seconds = 0.0

    def add(self, consumed: int, verdicts: int, dead_letters: int, seconds: float) -> None:
        """Count one scored batch."""
        self.batches += 1
        self.consumed += consumed
        self.verdicts += verdicts
        self.dead_letters += dead_letters
        self.seconds += seconds

    def report(self, now: float) -> None:
        """Log the counts since the last line and start again."""
        log.info("progress", batches=self.batches, consumed=self.consumed, verdicts=self.verdicts,
                 dead_letters=self.dead_letters, mean_batch_size=round(self.consumed / self.batches, 1),
                 mean_batch_ms=round(self.seconds * 1000 / self.batches, 3))
        self._start(now)


class _Step(IntEnum):
    """How a dead letter is sent: in a batch, then alone, then adjusted to what any topic accepts."""

    BATCHED = 0
    ALONE = 1
    ADJUSTED = 2


class _Transaction:
    """The open exactly-once transaction: its batches, where each partition started, and what went wrong."""

    def __init__(self) -> None:
        self.tickets: list[_Ticket] = []
        self.starts: dict[TP, int] = {}  # first offset of each input partition in the transaction
        self.ends: dict[TP, int] = {}  # last offset of each input partition in the transaction
        # Outputs refused by record errors: (ticket, verdict index) or (dead letter, step, refusal).
        self.suspects: list[tuple[_Ticket, int] | tuple[DeadLetter, _Step, str]] = []
        self.failed: str | None = None  # why it must be aborted


class _Fate:
    """How a record's output is sent after a probe showed the topic refuses it as it was (exactly-once)."""

    __slots__ = ("verdict_refusal", "adjusted_refusal")

    def __init__(self) -> None:
        self.verdict_refusal: str | None = None  # the verdict is refused: the record becomes a `produce` dead letter
        self.adjusted_refusal: str | None = None  # its dead letter is refused: send the adjusted one


def _bounded(call: Callable[[float], None], timeout: float, limit: float) -> None:
    """call(timeout) in a daemon thread; raise KafkaFatal if it has not returned after `limit` seconds."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            call(timeout)
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=target, name="transaction-call", daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        name = getattr(call, "__name__", None) or getattr(getattr(call, "func", None), "__name__", "a call")
        raise KafkaFatal(f"{name} did not return within {limit:g}s of its {timeout:g}s timeout (librdkafka waits for "
                         "a group coordinator that went away); the replica must restart")
    if failure:
        raise failure[0]


def _where(m: Message) -> tuple[str, int, int]:
    return m.topic(), m.partition(), m.offset()


class StartupError(RuntimeError):
    """The worker cannot start; nothing was consumed."""


class Worker:
    """One replica: owns a consumer, a producer, the offset tracker and the scorer it was given."""

    def __init__(
        self,
        settings: Settings,
        scorer: Scorer,
        codec: Codec | RecordCodec | None = None,
        stop: threading.Event | None = None,
        metrics: Metrics | None = None,
        health: Health | None = None,
    ):
        self.settings = settings
        self.scorer = scorer
        self.codec = codec or input_codec(settings.input_schema, scorer.manifest, settings.max_message_bytes)
        self.stop = stop or threading.Event()
        self.metrics = metrics or Metrics()
        self.health = health or Health(settings.health_timeout_s)
        self.tracker = OffsetTracker()
        self.fatal: str | None = None
        self._redo: list[Callable[[], None]] = []
        self._auth_error: str | None = None
        self._errors = FirstSeen(_REPEAT_QUIET_S)
        self._down_since = 0.0
        self._assigned: set[TP] = set()
        self._revocations = 0
        self._stop_deadline: float | None = None
        self._input_topic_id: str | None = None
        self.framed: FramedInput | None = None
        self._registry_retry_at = 0.0  # when a batch held for an unreachable registry is fetched again
        self._registry_backoff = _REGISTRY_BACKOFF_S[0]
        self._not_yet_back: set[TP] | None = None  # input partitions not yet reset since the topic went missing
        self.kafka: KafkaIO | None = None
        self._started = False
        self.exactly_once = settings.delivery == "exactly_once"
        self._txn = _Transaction()
        self._fates: dict[tuple[str, int, int], _Fate] = {}
        # Input ranges (last offset per partition) whose outputs are sent one per produce request: every refused
        # output passed its probe alone, so only their batching was refused (RECORD_LIST_TOO_LARGE and the like).
        self._one_at_a_time: dict[TP, int] = {}
        self._innocent_rounds = 0
        self._progress = _Progress()
        self.models = Models(settings, self.metrics, self.stop)
        m = scorer.manifest
        self.metrics.model.info({"name": m.name, "version": m.version, "sha256": m.sha256})
        self.health.model_loaded = True

    def start(self, offline: bool = False, fence: bool = True) -> None:
        """The start-up path shared by `run` and `check`: create the clients, reach the broker, find the topics.

        Raises StartupError with one line when librdkafka refuses the configuration, the broker cannot be reached or
        authenticated against within FRAUD_STARTUP_TIMEOUT_S, or a topic is missing. Nothing is consumed.
        `offline` stops after the clients are created (for image builds, where no broker runs). `fence=False` skips
        registering the transactional.id, which would fence a live replica with the same id (for `check`).
        """
        if self._started:
            return
        if self.kafka is None:
            try:
                self.kafka = KafkaIO(self.settings, self._on_assign, self._on_revoke, self._on_error, self._on_commit,
                                     failed=lambda: self.fatal is not None, stopping=self.stop.is_set)
            except ConfigError as exc:
                raise StartupError(str(exc)) from None
        if not offline:
            self.check_topics()
            if self.settings.registry_config():
                self._connect_registry()
            if self.exactly_once and fence:
                self._init_transactions()
            self._started = True

    def _init_transactions(self) -> None:
        """Register the transactional.id (fencing a predecessor with the same id and aborting its transaction)."""
        tid = transactional_id(self.settings)
        try:
            self.kafka.init_transactions(self.settings.startup_timeout_s)
        except KafkaException as exc:
            raise StartupError(f"cannot start exactly-once delivery with transactional.id {tid}: "
                               f"{exc.args[0].str()}") from None
        log.info("transactions_initialised", transactional_id=tid)
        if not self.settings.group_instance_id:
            log.warning("transactional_id_not_stable", transactional_id=tid,
                        detail="set FRAUD_GROUP_INSTANCE_ID (the pod name) so that a restarted replica aborts its "
                               "predecessor's open transaction at once")

    def _connect_registry(self) -> None:
        """Register the verdict schema under `<verdict topic>-value`; verdicts then carry its id (wire format)."""
        s = self.settings
        client = connect(s.registry_config())
        subject = f"{s.verdict_topic}-value"
        deadline = time.monotonic() + s.startup_timeout_s
        while True:
            try:
                verdict_id = register(client, subject, self.codec.verdict_avsc)
                break
            except RegistryUnavailable as exc:
                if time.monotonic() >= deadline or self.stop.is_set():
                    raise StartupError(f"Schema Registry at {s.registry_url_shown()} did not answer within "
                                       f"{s.startup_timeout_s:g}s: {exc}") from None
                time.sleep(0.5)
            except Exception as exc:
                raise StartupError(f"cannot register the verdict schema under {subject}: {exc}") from None
        self.codec.verdict_prefix = frame(verdict_id)
        self.framed = FramedInput(client, self.codec.transaction_schema, self.codec.transaction_logical_types)
        self.health.registry_reachable = True
        log.info("schema_registry_connected", verdict_subject=subject, verdict_schema_id=verdict_id)

    def check_topics(self) -> None:
        """Fail start-up with one clear line if the broker is unreachable or a topic is missing."""
        s = self.settings
        conf = {**client_config(s), "error_cb": self._on_error}
        topics = (s.input_topic, s.verdict_topic, s.dead_letter_topic) + ((s.shadow_topic,) if s.shadow_topic else ())
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
        """Run until the stop event is set (exit code 0) or a fatal error (exit code 1); while it runs, the objects the
        process held at start-up are frozen out of garbage collection (gc.freeze), and unfrozen when it stops."""
        self.start()
        s = self.settings
        if self.stop.is_set():
            self.kafka.close()
            return 0
        self._batch_limit = s.batch_max_size
        self._last_batch_s = 0.0
        budget = self.kafka.batch_budget_s()
        self.kafka.subscribe()
        watch = TopicWatch(client_config(s), s.input_topic).start()
        seen = watch.generation
        self.models.start(partial(ShadowOutput, s, s.shadow_topic) if s.shadow_topic else None)
        log.info("worker_started", input=s.input_topic, model=self.scorer.manifest.name,
                 model_version=self.scorer.manifest.version, batch_max_size=s.batch_max_size)
        last_commit, last_lag = time.monotonic(), 0.0
        commit_every = s.commit_interval_ms / 1000.0
        # A full collection scanned the ~136,000 objects of start-up (modules, model, clients) and paused the loop for
        # 45-80 ms about every 5 s under traffic (measured); frozen, they are left out of collections while it runs.
        gc.collect()
        gc.freeze()
        try:
            while not self.stop.is_set() and self.fatal is None:
                self.health.beat()
                if self._registry_retry_at and time.monotonic() >= self._registry_retry_at:
                    self._registry_retry_at = 0.0
                    self.kafka.release()
                revocations = self._revocations
                # Delivery reports are served between polls: while outputs await them, do not sleep long.
                block = _ACK_WAIT_S if self.tracker.in_flight() else _POLL_BLOCK_S
                if self.kafka.in_transaction:  # its verdicts are invisible until it commits: do not sleep past that
                    block = min(block, max(0.0, last_commit + commit_every - time.monotonic()))
                msgs = self.kafka.poll_batch(self._batch_limit, s.batch_max_wait_ms / 1000.0, block,
                                             s.latency_budget_ms / 1000.0, self._last_batch_s)
                if revocations != self._revocations:
                    # consume() can return messages fetched before a revoke it ran; their new owner scores them.
                    msgs = [m for m in msgs if (m.topic(), m.partition()) in self._assigned]
                swapped = self.models.swapped()
                if swapped is not None:
                    self._swap(swapped)
                if msgs:
                    self._last_batch_s = self._process(msgs)
                    self._adapt_batch_limit(self._last_batch_s, budget)
                self.kafka.serve_deliveries(0)
                self._produce_redo()
                if not self.health.broker_reachable and watch.answered_at > self._down_since:
                    self.health.broker_reachable = True
                    log.info("brokers_up")
                if watch.generation != seen:
                    seen = watch.generation
                    self._input_topic_changed(watch.present, watch.topic_id)
                now = time.monotonic()
                if now - last_commit >= commit_every or self._txn.failed:
                    self._commit(asynchronous=True)
                    last_commit = now
                if now - last_lag >= _LAG_INTERVAL_S:
                    self._update_lag()
                    last_lag = now
                if self._progress.batches and now - self._progress.since >= _LAG_INTERVAL_S:
                    self._progress.report(now)
        except Interrupted:
            log.info("batch_interrupted", reason="stop requested while the producer queue was full")
        except KafkaFatal as exc:
            self._fail(str(exc))
        except Exception as exc:  # a bug must still stop cleanly: drain, commit only what is acknowledged
            log.exception("unexpected_error")
            self._fail(f"unexpected {type(exc).__name__}: {exc}")
        finally:
            gc.unfreeze()  # what start-up left (this worker, its clients) can be collected again once it stops
        if self.stop.is_set() and self.fatal is None:
            log.info("stop_requested")
        watch.close()
        return self._shutdown()

    def _swap(self, model: LoadedModel) -> None:
        """Score with a new live model from the next batch on (a batch boundary); its verdicts carry its version."""
        old = self.scorer.manifest
        model.codec.verdict_prefix = self.codec.verdict_prefix
        self.scorer, self.codec = model.scorer, model.codec
        m = model.scorer.manifest
        self.metrics.model.info({"name": m.name, "version": m.version, "sha256": m.sha256})
        log.info("model_swapped", model=m.name, version=m.version, previous=f"{old.name} {old.version}")

    def _input_topic_changed(self, present: bool, topic_id: str | None) -> None:
        """Readiness follows the input topic; a re-created topic (new topic id) starts clean from its beginning."""
        topic = self.settings.input_topic
        self.health.input_topic_present = present
        mine = {tp for tp in self._assigned if tp[0] == topic}
        if not present:
            self._not_yet_back = mine
            log.error("input_topic_missing", topic=topic, detail="deleted or not visible; nothing is consumed or committed")
            return
        if self._input_topic_id not in (None, topic_id):
            # librdkafka resets an out-of-range position to the start, but keeps one the new topic already reached.
            rewind = self._not_yet_back if self._not_yet_back is not None else mine
            self.tracker.forget(rewind)
            log.warning("input_topic_recreated", topic=topic,
                        rewound=self.kafka.rewind(topic, {p for _, p in rewind}))
        else:
            log.info("input_topic_present", topic=topic)
        self._input_topic_id = topic_id
        self._not_yet_back = None

    def _adapt_batch_limit(self, seconds: float, budget: float) -> None:
        """Halve the batch when one took over a third of its budget (KafkaIO.batch_budget_s), so a slow model cannot
        livelock the group or have its transactions aborted."""
        if seconds > budget / 3 and self._batch_limit > 1:
            self._batch_limit = max(1, self._batch_limit // 2)
            log.warning("batch_limit_lowered", seconds=round(seconds, 3), batch_limit=self._batch_limit,
                        budget_s=budget)
        elif seconds < budget / 20 and self._batch_limit < self.settings.batch_max_size:
            self._batch_limit = min(self.settings.batch_max_size, self._batch_limit * 2)

    def _process(self, msgs: list[Message]) -> float:
        t0 = time.perf_counter()
        bodies = None
        if self.framed is not None:
            try:
                bodies = self.framed.bodies([m.value() for m in msgs])
            except RegistryUnavailable as exc:
                self._hold_for_registry(msgs, str(exc))
                return 0.0
            if not self.health.registry_reachable:
                self.health.registry_reachable = True
                self._registry_backoff = _REGISTRY_BACKOFF_S[0]
                log.info("schema_registry_available")
        scored, fated = msgs, []
        if self._fates:
            scored, bodies, fated = self._fated(msgs, bodies)
        now_ms = int(time.time() * 1000)
        outcome = score_batch(scored, self.scorer, self.codec, now_ms, bodies)
        outcome.dead_letters += fated
        self.models.shadow(outcome, self.codec, now_ms)
        where = [(m.partition(), m.offset()) for m in msgs]
        first, last = dict(reversed(where)), dict(where)
        topic = self.settings.input_topic
        for p, offset in first.items():
            if self.tracker.went_back((topic, p), offset):
                # Earlier output of this partition belongs to records that no longer exist: start it clean.
                self.tracker.forget({(topic, p)})
                if self._not_yet_back:
                    self._not_yet_back.discard((topic, p))
                log.warning("partition_offsets_went_back", partition=p, offset=offset)
        ticket = _Ticket(self, outcome, [self.tracker.open((topic, p), offset, 1) for p, offset in last.items()])
        if self.exactly_once:
            self._join_transaction(ticket, {(topic, p): offset for p, offset in first.items()},
                                   {(topic, p): offset for p, offset in last.items()})
        try:
            self.kafka.produce_all(self.settings.verdict_topic, [m.key() for m in outcome.scored], outcome.encoded,
                                   ticket.verdict_delivered, partial(self._verdict_refused_now, ticket))
            for dl in outcome.dead_letters:
                fate = self._fates.get(_where(dl.message)) if self._fates else None
                if fate and fate.adjusted_refusal:
                    self._produce_dead_letter(ticket, dl, _Step.ADJUSTED, fate.adjusted_refusal)
                else:
                    self._produce_dead_letter(ticket, dl, _Step.BATCHED)
        except Aborting as exc:
            self._txn.failed = self._txn.failed or str(exc)
        finally:
            self.kafka.one_at_a_time = False
        seconds = time.perf_counter() - t0
        self.metrics.consumed.inc(len(msgs))
        self.metrics.batch_size.observe(len(msgs))
        self.metrics.inference.observe(seconds)
        log.debug("batch_scored", size=len(msgs), verdicts=len(outcome.scored),
                  dead_letters=len(outcome.dead_letters), ms=round(seconds * 1000, 2))
        self._progress.add(len(msgs), len(outcome.scored), len(outcome.dead_letters), seconds)
        return seconds

    def _fated(self, msgs: list[Message], bodies: list | None) -> tuple[list[Message], list | None, list[DeadLetter]]:
        """Split off the records whose verdict a probe found refused: they become `produce` dead letters unscored."""
        keep, fated = [], []
        for i, m in enumerate(msgs):
            fate = self._fates.get(_where(m))
            if fate and fate.verdict_refusal:
                fated.append(DeadLetter(m, Stage.PRODUCE, "KafkaError", fate.verdict_refusal))
            else:
                keep.append(i)
        if not fated:
            return msgs, bodies, fated
        return [msgs[i] for i in keep], None if bodies is None else [bodies[i] for i in keep], fated

    def _hold_for_registry(self, msgs: list[Message], error: str) -> None:
        """Put the batch back (seek to its first offsets), pause the partitions, and fetch it again after a backoff."""
        self.kafka.hold(msgs)
        if self.health.registry_reachable:
            log.error("schema_registry_unavailable", error=error,
                      detail="input is paused; nothing is dead-lettered or committed past it")
        self.health.registry_reachable = False
        self._registry_retry_at = time.monotonic() + self._registry_backoff
        self._registry_backoff = min(self._registry_backoff * 2, _REGISTRY_BACKOFF_S[1])

    def _dead_letter_record(self, dl: DeadLetter, step: _Step, refusal: str) -> tuple:
        """(key, value, headers, timestamp) of a dead letter as sent at this step."""
        msg = dl.message
        now_ms = int(time.time() * 1000)
        if step is _Step.ADJUSTED:
            adj = adjusted_dead_letter(dl, refusal, self.settings.group_id, self.settings.worker_id, now_ms)
            return adj.key, adj.value, adj.headers, adj.timestamp_ms
        headers = dead_letter_headers(dl, self.settings.group_id, self.settings.worker_id, now_ms)
        ts_type, ts = msg.timestamp()
        return msg.key(), msg.value(), headers, ts if ts_type and ts >= 0 else 0

    def _produce_dead_letter(self, ticket: _Ticket, dl: DeadLetter, step: _Step, refusal: str = "") -> None:
        """Send a dead letter; a refused one is retried alone, then adjusted (see records.adjusted_dead_letter)."""
        msg = dl.message
        if step is _Step.BATCHED:
            log.debug("dead_letter", stage=dl.stage.value, reason=dl.error_message[:300], topic=msg.topic(),
                      partition=msg.partition(), offset=msg.offset())
        elif step is _Step.ADJUSTED:
            log.warning("dead_letter_adjusted", refusal=refusal[:300], topic=msg.topic(), partition=msg.partition(),
                        offset=msg.offset())
        key, value, headers, ts = self._dead_letter_record(dl, step, refusal)
        try:
            self.kafka.produce(self.settings.dead_letter_topic, key, value,
                               partial(self._dead_letter_delivered, ticket, dl, step, refusal), headers=headers,
                               timestamp=ts, alone=step is not _Step.BATCHED)
        except Refused as exc:
            self._dead_letter_refused(ticket, dl, step, refusal, exc.error, by_client=True)

    def _verdict_refused_now(self, ticket: _Ticket, i: int, err: KafkaError) -> None:
        """Verdict i was refused on its own (or by librdkafka in produce()), so it becomes a dead letter."""
        self.metrics.refusals.labels("verdict", "dead_letter").inc()
        ticket.refused.add(i)
        self._redo.append(partial(self._produce_dead_letter, ticket, self._refusal(ticket, i, err), _Step.BATCHED))

    def _verdict_refused(self, ticket: _Ticket, i: int, err: KafkaError, alone: bool) -> None:
        msg = ticket.outcome.scored[i]
        if self.exactly_once:
            self._transaction_refused(ticket, (ticket, i), err, "verdict", msg)
        elif err.code() not in RECORD_ERRORS:
            self._fail(f"verdict for {msg.topic()}[{msg.partition()}]@{msg.offset()} not acknowledged: {err.str()}")
        elif not alone:
            # The broker refuses a whole produce batch for one record: retry alone before judging this one.
            self.metrics.refusals.labels("verdict", "alone").inc()
            self._redo.append(partial(self._produce_verdict_alone, ticket, i))
        else:
            self._verdict_refused_now(ticket, i, err)

    def _produce_verdict_alone(self, ticket: _Ticket, i: int) -> None:
        def delivered(err: KafkaError | None, _produced) -> None:
            if err is None:
                ticket.acked()
            else:
                self._verdict_refused(ticket, i, err, alone=True)

        try:
            self.kafka.produce(self.settings.verdict_topic, ticket.outcome.scored[i].key(), ticket.outcome.encoded[i],
                               delivered, alone=True)
        except Refused as exc:
            self._verdict_refused_now(ticket, i, exc.error)

    @staticmethod
    def _refusal(ticket: _Ticket, i: int, err: KafkaError) -> DeadLetter:
        return DeadLetter(ticket.outcome.scored[i], Stage.PRODUCE, "KafkaError",
                          f"verdict refused by the verdict topic: {err.str()}")

    def _dead_letter_delivered(self, ticket: _Ticket, dl: DeadLetter, step: _Step, refusal: str,
                               err: KafkaError | None, _produced) -> None:
        if err is None:
            ticket.dead_letter_stages.append(dl.stage.value)
            ticket.acked()
        else:
            self._dead_letter_refused(ticket, dl, step, refusal, err, by_client=False)

    def _dead_letter_refused(self, ticket: _Ticket, dl: DeadLetter, step: _Step, refusal: str, err: KafkaError,
                             by_client: bool) -> None:
        m = dl.message
        if self.exactly_once and not by_client:
            self._transaction_refused(ticket, (dl, step, refusal), err, "dead letter", m)
            return
        if err.code() not in RECORD_ERRORS or step is _Step.ADJUSTED:
            self._fail(f"dead letter for {m.topic()}[{m.partition()}]@{m.offset()} not acknowledged: {err.str()}")
            return
        # librdkafka refuses a record in produce() for the record alone; the broker may refuse it for its batch.
        following = _Step.ADJUSTED if by_client or step is _Step.ALONE else _Step.ALONE
        self.metrics.refusals.labels("dead_letter", following.name.lower()).inc()
        self._redo.append(partial(self._produce_dead_letter, ticket, dl, following, err.str()))

    def _batch_acked(self, ticket: _Ticket) -> None:
        for s in ticket.slices:
            self.tracker.ack(s)
        if not self.exactly_once:  # counted when its transaction commits
            self._count(ticket)

    def _count(self, ticket: _Ticket) -> None:
        self.metrics.batch_acked(ticket.outcome, ticket.refused, ticket.dead_letter_stages, time.time())

    def _produce_redo(self) -> None:
        """Send the outputs that were refused (retries alone, dead letters, adjusted dead letters), oldest first."""
        while self._redo and self.fatal is None:
            redo = self._redo.pop(0)
            try:
                redo()
            except Interrupted:
                self._redo.insert(0, redo)
                return
            except Aborting as exc:  # the whole transaction is re-scored after its abort
                self._txn.failed = self._txn.failed or str(exc)
                self._redo.clear()

    def _drain(self, timeout: float) -> int:
        """Flush until every output is acknowledged (re-producing refused records as dead letters) or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = self.kafka.flush(max(0.0, deadline - time.monotonic()))
            if not self._redo or self.fatal is not None or time.monotonic() >= deadline:
                return remaining + len(self._redo)
            self._produce_redo()

    def _commit(self, asynchronous: bool, tps: set[TP] | None = None) -> None:
        if self.exactly_once:
            self._end_transaction()
            return
        if asynchronous:
            positions = self.tracker.to_commit(tps)
        else:
            # A final commit resends every safe position: an earlier async commit of it may still fail.
            positions = {tp: pos for tp, pos in self.tracker.safe_positions().items() if tps is None or tp in tps}
        if not positions:
            return
        if not self.health.broker_reachable:
            # A commit waits for a coordinator that is away, and so would close(); offer the positions again later.
            self.tracker.uncommit(positions)
            return
        try:
            self.kafka.commit(positions, asynchronous=asynchronous)
            self.metrics.commits.inc()
        except KafkaException as exc:
            self.tracker.uncommit(positions)
            self.metrics.commit_failures.inc()
            log.warning("commit_failed", error=exc.args[0].str(), partitions=len(positions), sync=not asynchronous)

    def _join_transaction(self, ticket: _Ticket, first: dict[TP, int], last: dict[TP, int]) -> None:
        """Send this batch's outputs in the open transaction (opening one if needed), one at a time if so marked."""
        try:
            self.kafka.begin_transaction()
        except KafkaException as exc:
            raise KafkaFatal(f"cannot begin a transaction: {exc.args[0].str()}") from None
        self._txn.tickets.append(ticket)
        for tp, offset in first.items():
            self._txn.starts.setdefault(tp, offset)
            if self._one_at_a_time.get(tp, -1) >= offset:
                self.kafka.one_at_a_time = True
        self._txn.ends.update(last)

    def _transaction_refused(self, ticket: _Ticket, suspect: tuple, err: KafkaError, what: str, m: Message) -> None:
        """An output of the open transaction was not written: the transaction is aborted and its records re-scored."""
        code = err.code()
        if ticket.void or code in _PURGED:
            return
        if err.fatal() or code in _DENIED:
            self._fail(f"{what} for {m.topic()}[{m.partition()}]@{m.offset()} not acknowledged: {err.str()}")
        elif code in RECORD_ERRORS:
            self._txn.suspects.append(suspect)
        self._txn.failed = self._txn.failed or err.str()

    def _end_transaction(self, keep: set[TP] | None = None) -> None:
        """Commit the open transaction with its input positions, or abort it and fetch its records again.

        `keep` are the partitions to fetch again after an abort (default: all assigned).
        """
        if not self.kafka.in_transaction or self.fatal is not None:
            return
        if not self.health.broker_reachable:
            # Offsets sent to a coordinator that is away can wait forever (see _retrying): commit once it is back.
            return
        remaining = self._drain(self._time_left())
        txn = self._txn
        if self.fatal is not None:
            return
        if txn.failed or remaining:
            self._abort(txn.failed or f"{remaining} outputs not acknowledged in time", keep)
            return
        positions = self.tracker.to_commit()
        for step in (partial(self.kafka.send_offsets, positions), self.kafka.commit_transaction):
            err = self._retrying(step)
            if err is not None:
                if err.fatal():
                    self._fail(f"transaction not committed: {err.str()}")
                else:
                    self._abort(err.str(), keep)
                return
        for ticket in txn.tickets:
            self._count(ticket)
        self.metrics.commits.inc()
        self._innocent_rounds = 0
        self._txn = _Transaction()
        if self._fates:
            self._fates = {w: f for w, f in self._fates.items() if w[2] >= positions.get(w[:2], -1)}
        if self._one_at_a_time:
            self._one_at_a_time = {tp: o for tp, o in self._one_at_a_time.items() if o >= positions.get(tp, -1)}

    def _abort(self, reason: str, keep: set[TP] | None = None) -> None:
        """Abort the open transaction, probe what was refused, and seek back to where the transaction started."""
        txn, self._txn = self._txn, _Transaction()
        for ticket in txn.tickets:
            ticket.void = True
        self._redo.clear()
        log.warning("transaction_aborted", reason=reason[:300], batches=len(txn.tickets), refused=len(txn.suspects))
        self.metrics.aborts.labels("refused" if txn.suspects else "error").inc()
        err = self._retrying(self.kafka.abort_transaction)
        if err is not None:
            self._fail(f"transaction not aborted: {err.str()}")
            return
        if txn.suspects and not self._probe(txn.suspects):
            self._one_at_a_time.update(txn.ends)
        self.tracker.forget(set(txn.starts))
        keep = self._assigned if keep is None else keep
        self.kafka.seek({tp: offset for tp, offset in txn.starts.items() if tp in keep})

    def _retrying(self, call: Callable[[float], None]) -> KafkaError | None:
        """Run a transactional call, repeating it while librdkafka says a retry can succeed; its final error.

        Raises KafkaFatal when a call outlives its timeout by _HUNG_S: librdkafka's send_offsets_to_transaction can
        wait forever for a group coordinator that went away (confluentinc/librdkafka#5456, #5511), holding the
        partitions unscored; a restart of the replica recovers.
        """
        while True:
            timeout = min(5.0, max(0.1, self._time_left()))
            try:
                _bounded(call, timeout, timeout + _HUNG_S)
                return None
            except KafkaException as exc:
                err = exc.args[0]
                if err.fatal() or err.txn_requires_abort() or not err.retriable() or self._time_left() <= 0:
                    return err
                self.health.beat()
                log.info("transaction_call_retried", error=err.str()[:300])

    def _probe(self, suspects: list[tuple]) -> int:
        """Learn which refused outputs a topic refuses alone, and record how each is sent when re-scored.

        A verdict refused alone becomes a `produce` dead letter; a dead letter refused alone is adjusted; an adjusted
        one refused alone stops the worker. Returns how many outputs were refused alone.
        """
        verdicts = [x for x in suspects if isinstance(x[0], _Ticket)]
        dead = [x for x in suspects if not isinstance(x[0], _Ticket)]
        refused = self._refused_alone([(self.settings.verdict_topic, t.outcome.scored[i].key(), t.outcome.encoded[i],
                                        None, 0) for t, i in verdicts])
        for k, err in refused:
            ticket, i = verdicts[k]
            dl = self._refusal(ticket, i, err)
            self._fates.setdefault(_where(dl.message), _Fate()).verdict_refusal = dl.error_message
            self.metrics.refusals.labels("verdict", "dead_letter").inc()
            dead.append((dl, _Step.BATCHED, ""))
        guilty = len(refused)
        plain = [x for x in dead if x[1] is not _Step.ADJUSTED]
        adjusted = [x for x in dead if x[1] is _Step.ADJUSTED]
        refused = self._refused_alone([(self.settings.dead_letter_topic, *self._dead_letter_record(dl, _Step.ALONE, ""))
                                       for dl, _, _ in plain])
        for k, err in refused:
            dl = plain[k][0]
            self._fates.setdefault(_where(dl.message), _Fate()).adjusted_refusal = err.str()
            self.metrics.refusals.labels("dead_letter", "adjusted").inc()
            adjusted.append((dl, _Step.ADJUSTED, err.str()))
        guilty += len(refused)
        refused = self._refused_alone([(self.settings.dead_letter_topic,
                                        *self._dead_letter_record(dl, _Step.ADJUSTED, refusal))
                                       for dl, _, refusal in adjusted])
        for k, err in refused[:1]:
            m = adjusted[k][0].message
            self._fail(f"dead letter for {m.topic()}[{m.partition()}]@{m.offset()} not acknowledged: {err.str()}")
        self._innocent_rounds = 0 if guilty else self._innocent_rounds + 1
        if self._innocent_rounds >= _INNOCENT_ROUNDS:
            self._fail(f"{_INNOCENT_ROUNDS} transactions in a row were refused, but no record is refused alone")
        return guilty

    def _refused_alone(self, records: list[tuple]) -> list[tuple[int, KafkaError]]:
        """(index, refusal) of the records refused alone, found by probing halves of what is refused together."""
        found, pending = [], [list(range(len(records)))] if records else []
        while pending and self.fatal is None:
            group = pending.pop()
            results = list(zip(group, self._probe_group([records[i] for i in group])))
            failed = [(i, err) for i, err in results if err is not None and err.code() in RECORD_ERRORS]
            unsent = [i for i, err in results if err is not None and err.code() not in RECORD_ERRORS]
            if unsent:  # queued behind a refusal and purged by the probe's abort: no answer yet
                pending.append(unsent)
            if len(failed) == 1:  # a produce batch fails as a whole, so a lone failure is that record's own
                found.append(failed[0])
            elif failed:
                half = len(failed) // 2
                pending += [[i for i, _ in failed[:half]], [i for i, _ in failed[half:]]]
        return found

    def _probe_group(self, records: list[tuple]) -> list[KafkaError | None]:
        """Each record's refusal in one probe (see KafkaIO.probe), retried while no record got an answer."""
        for attempt in range(_PROBE_ATTEMPTS):
            self.health.beat()
            time.sleep(0.05 * (2**attempt - 1))  # the producer's epoch bump after a refusal takes a moment
            try:
                return self.kafka.probe(records, min(5.0, max(0.1, self._time_left())))
            except KafkaException as exc:
                err = exc.args[0]
                if err.fatal():
                    break
                log.info("probe_retried", records=len(records), error=err.str()[:300])
                if self.kafka.in_transaction and self._retrying(self.kafka.abort_transaction) is not None:
                    break
        raise KafkaFatal(f"cannot learn which refused outputs a topic refuses alone: {err.str()}")

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

    def _time_left(self) -> float:
        """Time for a drain: the whole shutdown timeout, or what is left of it once shutdown began."""
        if self._stop_deadline is None:
            return self.settings.shutdown_timeout_s
        return max(0.0, self._stop_deadline - time.monotonic())

    def _on_revoke(self, tps: set[TP], lost: bool) -> None:
        if self.exactly_once:
            # Commit the transaction while the partitions are ours; lost ones cannot commit, so it is aborted.
            if lost and self.kafka.in_transaction and self.fatal is None:
                self._abort("partitions lost", keep=self._assigned - tps)
            elif not lost:
                self._end_transaction(keep=self._assigned - tps)
            self._fates = {w: f for w, f in self._fates.items() if w[:2] not in tps}
            self._one_at_a_time = {tp: o for tp, o in self._one_at_a_time.items() if tp not in tps}
        elif not lost and self.fatal is None:
            remaining = self._drain(self._time_left())
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
        elif not self.health.broker_reachable and (code == KafkaError._SSL or "SSL handshake failed" in err.str()):
            # At start-up a TLS failure is a configuration error (wrong protocol, CA or certificate), not an outage.
            self._auth_error = f"TLS with Kafka failed: {err.str()}"
        elif err.fatal():
            self._fail(f"fatal Kafka error: {err.str()}")
        elif code == KafkaError._ALL_BROKERS_DOWN:
            self.health.broker_reachable = False
            self._down_since = time.monotonic()
            if self._errors.first(err.str()):
                log.warning("brokers_down", error=err.str())
        elif self._errors.first(err.str()):
            log.warning("kafka_error", error=err.str())

    def _fail(self, reason: str) -> None:
        if self.fatal is None:
            self.fatal = reason
            log.error("worker_failed", reason=reason)

    def _shutdown(self) -> int:
        self._stop_deadline = time.monotonic() + self.settings.shutdown_timeout_s
        # A failed transactional producer can neither flush nor commit; its transaction is aborted for it.
        settle = self.kafka is not None and not (self.exactly_once and self.fatal)
        outstanding = self._drain(self._time_left()) if settle else 0
        if self.kafka:
            if settle:
                try:
                    self._commit(asynchronous=False)
                except KafkaFatal as exc:
                    self._fail(str(exc))
            # Only a broker that is away can hold close() past the deadline; otherwise close as librdkafka intends.
            if not self.kafka.close(None if self.health.broker_reachable else self._time_left()):
                log.warning("consumer_close_timed_out", detail="the group drops this member after session.timeout.ms")
        self.models.close(min(_SHADOW_FLUSH_S, self._time_left()))
        if self._progress.batches:
            self._progress.report(time.monotonic())
        log.info("worker_stopped", reason=self.fatal or "stop requested", unacknowledged=outstanding)
        return 1 if self.fatal else 0
