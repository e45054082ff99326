"""`fraud-worker dlq`: count, print and replay dead letters; a compacted ledger topic makes a replay happen once."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal

from confluent_kafka import (
    TIMESTAMP_CREATE_TIME, Consumer, IsolationLevel, KafkaError, KafkaException, Producer, TopicPartition,
)
from confluent_kafka.admin import NewTopic, OffsetSpec

from ..kafka import QUIET_LOG, KafkaFatal, admin, client_config, describe_topics, send
from ..settings import Settings

ERRORS = "fraud.errors."
REPLAY = "fraud.replay."
REPLAY_OF, REPLAY_AT = "fraud.replay.of", "fraud.replay.at"
# What --since/--until compare: the time of failure, not the record's timestamp (that is the original's event time).
TIME_FIELD = "fraud.errors.timestamp"
COMMIT_EVERY = 500  # records per replay transaction…
COMMIT_AFTER_S = 5.0  # …or seconds, whichever comes first: a slow --rate never outlives transaction.timeout.ms
TRANSACTION_TIMEOUT_MS = 60_000
Emit = Callable[[dict], None]


class DlqError(RuntimeError):
    """The one-line reason a dlq command stopped."""


def parse_time(text: str) -> int:
    """Epoch ms from epoch-ms digits or ISO-8601 text (UTC when it has no offset); ValueError otherwise."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    when = datetime.fromisoformat(text)
    return int((when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp() * 1000)


@dataclass(slots=True)
class Letter:
    """One record of the dead-letter topic; `errors` holds its fraud.errors.* headers as text, without the prefix."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    timestamp: tuple[int, int]  # (confluent_kafka timestamp type, epoch ms)
    errors: dict[str, str]

    @property
    def coordinates(self) -> str:
        """`<dlq topic>/<partition>/<offset>`: the ledger key and the replay marker."""
        return f"{self.topic}/{self.partition}/{self.offset}"

    def failed_at(self) -> int:
        """Epoch ms of the failure (fraud.errors.timestamp), else the record's timestamp."""
        try:
            return int(self.errors["timestamp"])
        except (KeyError, ValueError):
            return self.timestamp[1]

    def replay_of(self) -> str | None:
        """The dead letter this record's original was a replay of (its fraud.replay.of header), or None."""
        value = next((v for k, v in self.headers if k == REPLAY_OF), None)
        return value.decode(errors="replace") if value is not None else None

    def unreplayable(self, again: bool = False) -> str | None:
        """Why the original record should not be rebuilt from this dead letter, or None; `again` allows the dead
        letters of records that were replays themselves."""
        if "stage" not in self.errors:
            return "not a dead letter (no fraud.errors.stage header)"
        if not again and self.replay_of():
            # Replaying it again would loop while the fix does not hold; --again says it does now.
            return "a replay that failed again (use --again to replay it once more)"
        changes = self.errors.get("adjusted")
        if changes is None:
            return None
        if "value.dropped" in changes.split(","):
            return "value dropped when the dead letter was adjusted"
        return "adjusted: the original key, headers or timestamp are not kept"

    def original(self) -> tuple[bytes | None, bytes | None, list, int]:
        """(key, value, headers without fraud.errors.* and fraud.replay.*, timestamp ms or 0 for the producer's clock).

        The worker writes a dead letter with the original's timestamp (CreateTime); a dead-letter topic with
        LogAppendTime keeps only the broker's, so the replay then takes the producer's clock.
        """
        headers = [(k, v) for k, v in self.headers if not k.startswith((ERRORS, REPLAY))]
        ts_type, ts = self.timestamp
        return self.key, self.value, headers, ts if ts_type == TIMESTAMP_CREATE_TIME and ts > 0 else 0


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters a command takes: DLQ partitions, offsets (both inclusive), failure time [since, until) in
    epoch ms, stages and reasons (exception class names); None or empty takes all."""

    partitions: frozenset[int] | None = None
    from_offset: int | None = None
    to_offset: int | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    stages: frozenset[str] = frozenset()
    reasons: frozenset[str] = frozenset()

    def matches(self, letter: Letter) -> bool:
        """Whether the dead letter passes the stage, reason and time filters (offsets are applied when reading)."""
        when = letter.failed_at()
        return ((not self.stages or letter.errors.get("stage") in self.stages)
                and (not self.reasons or letter.errors.get("exception.class.name") in self.reasons)
                and (self.since_ms is None or when >= self.since_ms)
                and (self.until_ms is None or when < self.until_ms))


def inspect(settings: Settings, selection: Selection, emit: Emit | None = None) -> dict:
    """Counts of the selected dead letters by stage, reason and source partition; each one to `emit` if given."""
    conf, topic, timeout = client_config(settings), settings.dead_letter_topic, settings.startup_timeout_s
    ranges = _ranges(conf, topic, _existing(conf, [topic], timeout)[topic], selection, timeout)
    describe = Describer(settings) if emit else None
    by = {"stage": Counter(), "reason": Counter(), "source_partition": Counter()}
    total, unreplayable = 0, Counter()
    for letter in scan(conf, topic, ranges, timeout):
        if not selection.matches(letter):
            continue
        total += 1
        by["stage"][letter.errors.get("stage", "?")] += 1
        by["reason"][letter.errors.get("exception.class.name", "?")] += 1
        by["source_partition"][f"{letter.errors.get('topic', '?')}/{letter.errors.get('partition', '?')}"] += 1
        if why := letter.unreplayable():
            unreplayable[why] += 1
        if describe:
            emit(describe(letter))
    return {"topic": topic, "time_field": TIME_FIELD, "read": _shown(ranges), "dead_letters": total,
            **{f"by_{k}": dict(sorted(c.items())) for k, c in by.items()}, "not_replayable": dict(unreplayable)}


def replay(settings: Settings, selection: Selection, to_topic: str | None = None, ledger_topic: str | None = None,
           dry_run: bool = False, rate: float = 0.0, progress: bool = True, emit: Emit | None = None,
           again: bool = False) -> dict:
    """Re-produce the selected dead letters that the ledger does not list to `to_topic` (default: the input topic),
    each with its ledger entry in one transaction; at most `rate` records/s (0: unlimited). Returns the summary."""
    from tqdm import tqdm

    conf, dlq, timeout = client_config(settings), settings.dead_letter_topic, settings.startup_timeout_s
    to_topic, ledger = to_topic or settings.input_topic, ledger_topic or f"{dlq}.replayed"
    found = _existing(conf, [dlq, to_topic], timeout, optional=(ledger,))
    ranges = _ranges(conf, dlq, found[dlq], selection, timeout)
    producer = None
    if not dry_run:
        if ledger not in found:
            _create_ledger(conf, ledger, timeout)
        # Before the ledger is read: this fences an earlier replay and ends its open transaction, so every ledger entry
        # it will ever commit is already committed (or aborted) when the ledger is read.
        producer = _transactional_producer(conf, dlq, timeout)
    done = _ledger(conf, ledger, timeout) if (ledger in found or producer) else set()
    describe = Describer(settings) if emit else None
    counts, skipped, pending = Counter(), Counter(), []
    started = opened = time.monotonic()
    bar = tqdm(total=sum(end - start for start, end in ranges.values()), unit="record", desc=f"replay {dlq}",
               file=sys.stderr, disable=not progress or not sys.stderr.isatty())
    try:
        for letter in scan(conf, dlq, ranges, timeout):
            bar.update(1)
            if not selection.matches(letter):
                continue
            counts["selected"] += 1
            why = letter.unreplayable(again)
            if letter.coordinates in done:
                counts["already_replayed"] += 1
            elif why:
                skipped[why] += 1
            else:
                counts["chosen"] += 1
                if describe:
                    emit(describe(letter))
                if producer is None:
                    continue
                if not pending:
                    producer.begin_transaction()
                    opened = time.monotonic()
                _send(producer, letter, to_topic, found[to_topic], ledger)
                pending.append(letter.coordinates)
                if len(pending) >= COMMIT_EVERY or time.monotonic() - opened >= COMMIT_AFTER_S:
                    counts["replayed"] += _commit(producer, pending, done, timeout)
                if rate > 0:
                    time.sleep(max(0.0, started + counts["chosen"] / rate - time.monotonic()))
        if pending:
            counts["replayed"] += _commit(producer, pending, done, timeout)
    except (DlqError, KafkaException, KeyboardInterrupt) as exc:
        raise DlqError(_stopped(producer, exc, counts["replayed"], dlq, timeout)) from None
    finally:
        bar.close()
    summary = {"dead_letter_topic": dlq, "to_topic": to_topic, "ledger_topic": ledger, "dry_run": dry_run,
               "time_field": TIME_FIELD, "read": _shown(ranges), "selected": counts["selected"],
               "replayed": counts["replayed"], "already_replayed": counts["already_replayed"],
               "skipped": dict(skipped)}
    if dry_run:
        summary["would_replay"] = counts["chosen"]
    return summary


def scan(conf: dict, topic: str, ranges: dict[int, tuple[int, int]], stall_s: float) -> Iterator[Letter]:
    """The committed records of `topic` in [start, end) of each partition; DlqError after `stall_s` without progress."""
    todo = {p: end for p, (start, end) in ranges.items() if start < end}
    if not todo:
        return
    consumer = Consumer({"logger": QUIET_LOG, **conf, "group.id": f"fraud-dlq-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         "isolation.level": "read_committed", "enable.partition.eof": True})
    try:
        consumer.assign([TopicPartition(topic, p, ranges[p][0]) for p in todo])
        waited = 0.0  # seconds of empty polls in a row (not time spent by the caller between records)
        while todo:
            polled = time.monotonic()
            msgs = consumer.consume(500, 0.5)
            waited = 0.0 if msgs else waited + time.monotonic() - polled
            if waited > stall_s:
                raise DlqError(f"reading {topic} made no progress for {stall_s:g}s (is Kafka at "
                               f"{conf['bootstrap.servers']} up?)")
            for m in msgs:
                p, err = m.partition(), m.error()
                if p not in todo:
                    continue
                if err is None:
                    if m.offset() < todo[p]:
                        yield _letter(m)
                    if m.offset() + 1 >= todo[p]:
                        del todo[p]
                elif err.code() == KafkaError._PARTITION_EOF:
                    # After control records or aborted transactions, the end of the range shows only as this event.
                    if m.offset() >= todo[p]:
                        del todo[p]
                elif not err.retriable():
                    raise DlqError(f"cannot read {topic} partition {p}: {err.str()}")
    finally:
        consumer.close()


def _letter(m) -> Letter:
    try:
        headers = list(m.headers() or [])
    except (UnicodeDecodeError, ValueError):  # a header name that is not UTF-8
        headers = []
    errors = {k[len(ERRORS):]: (v or b"").decode(errors="replace") for k, v in headers if k.startswith(ERRORS)}
    return Letter(m.topic(), m.partition(), m.offset(), m.key(), m.value(), headers, m.timestamp(), errors)


def _existing(conf: dict, topics: list[str], timeout: float, optional: tuple[str, ...] = ()) -> dict[str, int]:
    """Partition count of each topic and of the optional ones that exist; DlqError if Kafka or a topic is missing."""
    try:
        found = describe_topics(conf, [*topics, *optional], timeout)
    except KafkaFatal as exc:
        raise DlqError(str(exc)) from None
    for topic in topics:
        if topic not in found:
            raise DlqError(f"topic {topic} does not exist on {conf['bootstrap.servers']}")
    return found


def _ranges(conf: dict, topic: str, partitions: int, sel: Selection, timeout: float) -> dict[int, tuple[int, int]]:
    """[start, end) per partition: the selection's offsets within the log start and the last stable offset now."""
    wanted = sorted(sel.partitions) if sel.partitions is not None else list(range(partitions))
    if bad := [p for p in wanted if not 0 <= p < partitions]:
        raise DlqError(f"{topic} has no partition {bad[0]} (it has {partitions})")
    client = admin(conf)

    def offsets(spec) -> dict[int, int]:
        deadline = time.monotonic() + timeout
        while True:
            futures = client.list_offsets({TopicPartition(topic, p): spec for p in wanted},
                                          isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=timeout)
            try:
                return {tp.partition: f.result().offset for tp, f in futures.items()}
            except KafkaException as exc:
                # A topic just created, or a partition whose leader moves, answers NOT_LEADER for a moment.
                if not exc.args[0].retriable() or time.monotonic() > deadline:
                    raise DlqError(f"cannot read the offsets of {topic}: {exc.args[0].str()}") from None
                time.sleep(0.2)

    if not wanted:
        return {}
    low, high = offsets(OffsetSpec.earliest()), offsets(OffsetSpec.latest())
    last = {p: high[p] if sel.to_offset is None else min(high[p], sel.to_offset + 1) for p in wanted}
    return {p: (max(low[p], sel.from_offset or 0), last[p]) for p in wanted}


def _shown(ranges: dict[int, tuple[int, int]]) -> dict[str, list[int]]:
    return {str(p): [start, end] for p, (start, end) in ranges.items()}


def _create_ledger(conf: dict, topic: str, timeout: float) -> None:
    """The ledger topic: compacted, one partition, the broker's default replication factor."""
    client = admin(conf)  # kept alive until the answer: a client destroyed early fails its futures
    future = client.create_topics([NewTopic(topic, 1, -1, config={"cleanup.policy": "compact"})],
                                  operation_timeout=timeout, request_timeout=timeout)[topic]
    try:
        future.result()
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise DlqError(f"cannot create the replay ledger topic {topic}: {exc.args[0].str()}") from None


def _ledger(conf: dict, topic: str, timeout: float) -> set[str]:
    """Coordinates already replayed: the ledger's keys whose last value is not a tombstone."""
    done: set[str] = set()
    ranges = _ranges(conf, topic, _existing(conf, [topic], timeout)[topic], Selection(), timeout)
    for entry in scan(conf, topic, ranges, timeout):
        key = (entry.key or b"").decode(errors="replace")
        (done.add if entry.value is not None else done.discard)(key)
    return done


def _transactional_producer(conf: dict, dlq: str, timeout: float) -> Producer:
    """The replay producer; its transactional.id is per dead-letter topic, so a newer replay fences an older one."""
    producer = Producer({"logger": QUIET_LOG, **conf, "transactional.id": f"fraud-dlq-replay.{dlq}",
                         "enable.idempotence": True, "acks": "all", "linger.ms": 5,
                         "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS})
    try:
        producer.init_transactions(max(timeout, 30.0))
    except KafkaException as exc:
        raise DlqError(f"cannot start the replay transaction on {conf['bootstrap.servers']}: "
                       f"{exc.args[0].str()}") from None
    return producer


def _send(producer: Producer, letter: Letter, to_topic: str, partitions: int, ledger: str) -> None:
    """Queue the original record, marked as a replay, and its ledger entry (in the open transaction)."""
    key, value, headers, ts = letter.original()
    now = int(time.time() * 1000)
    headers += [(REPLAY_OF, letter.coordinates.encode()), (REPLAY_AT, str(now).encode())]
    where = {}
    # Back to its own partition when replayed into its source topic: the key's partition as its producer chose it.
    if letter.errors.get("topic") == to_topic and letter.errors.get("partition", "").isdigit():
        if int(letter.errors["partition"]) < partitions:
            where["partition"] = int(letter.errors["partition"])
    send(producer, to_topic, value, key, headers=headers, timestamp=ts, **where)
    entry = {"to_topic": to_topic, "replayed_at": now, **{k: letter.errors.get(k) for k in ("topic", "partition",
                                                                                             "offset")}}
    send(producer, ledger, json.dumps(entry).encode(), letter.coordinates.encode())


def _commit(producer: Producer, pending: list[str], done: set[str], timeout: float) -> int:
    """Commit the open transaction; return how many records it replayed."""
    producer.commit_transaction(max(timeout, 30.0))
    done.update(pending)
    n = len(pending)
    pending.clear()
    return n


def _stopped(producer: Producer | None, exc: BaseException, replayed: int, dlq: str, timeout: float) -> str:
    """Abort the open transaction; say why the replay stopped and how far it got."""
    if producer is not None:
        try:
            producer.abort_transaction(timeout)
        except KafkaException:
            pass  # fenced or gone: the coordinator aborts it
    if isinstance(exc, KeyboardInterrupt):
        why = "interrupted"
    elif isinstance(exc, DlqError):
        why = str(exc)
    elif exc.args[0].code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED):
        why = f"fenced by a newer replay of {dlq} (transactional.id fraud-dlq-replay.{dlq})"
    else:
        why = exc.args[0].str()
    return f"replay stopped: {why}; {replayed} dead letters replayed and in the ledger before that, none after"


class Describer:
    """Dead letters as JSON-ready dicts, values decoded with the worker's input codec where they decode."""

    def __init__(self, settings: Settings):
        from ..avro.codec import Codec
        from ..avro.recordcodec import input_codec, load_input_schema
        from ..model.manifest import Manifest, ManifestError

        try:
            manifest = Manifest.load(settings.model_manifest, load_input_schema(settings.input_schema))
        except ManifestError as exc:
            raise DlqError(str(exc)) from None
        self.codec = input_codec(settings.input_schema, manifest, settings.max_message_bytes)
        self.typed = isinstance(self.codec, Codec)
        self.framed = bool(settings.schema_registry_url)

    def __call__(self, letter: Letter) -> dict:
        """The dead letter: where it failed and why, its original key, headers, timestamp and value."""
        key, value, headers, _ = letter.original()
        e = letter.errors
        ts_type = {0: "none", 1: "create_time", 2: "log_append_time"}.get(letter.timestamp[0], "?")
        return {"dead_letter": letter.coordinates, "stage": e.get("stage"), "reason": e.get("exception.class.name"),
                "message": e.get("exception.message"), "failed_at": letter.failed_at(),
                "source": {"topic": e.get("topic"), "partition": _int(e.get("partition")),
                           "offset": _int(e.get("offset"))},
                "timestamp": letter.timestamp[1], "timestamp_type": ts_type, "replay_of": letter.replay_of(),
                "key": text(key),
                "headers": [[k, text(v)] for k, v in headers], "errors": e, **self.value(value)}

    def value(self, raw: bytes | None) -> dict:
        """{"value": the decoded record} or {"value": None, "value_base64": …, "decode_error": …}."""
        if raw is None:
            return {"value": None}
        body = raw[5:] if self.framed and len(raw) > 5 and raw[0] == 0 else raw  # Confluent wire format
        try:
            batch, errors = self.codec.decode_batch([body])
            if not errors:
                return {"value": dataclasses.asdict(batch.transaction(0)) if self.typed else batch.records[0]}
            error: Exception = errors[0]
        except Exception as exc:  # hostile bytes may provoke anything in a decoder
            error = exc
        return {"value": None, "value_base64": base64.b64encode(raw).decode(),
                "decode_error": f"{type(error).__name__}: {error}"}


def text(raw: bytes | None) -> str | dict | None:
    """Bytes as UTF-8 text, or {"base64": …} when they are not UTF-8."""
    if raw is None:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(raw).decode()}


def _int(v: str | None) -> int | str | None:
    return int(v) if v and v.lstrip("-").isdigit() else v


def to_json(obj) -> str:
    """One JSON line; decoded Avro values (timestamps, decimals, bytes) as text."""
    def plain(v):
        if isinstance(v, datetime):
            return v.isoformat()
        if isinstance(v, bytes):
            return text(v)
        if isinstance(v, Decimal):
            return str(v)
        raise TypeError(f"{type(v).__name__} is not JSON")

    return json.dumps(_finite(obj), default=plain, ensure_ascii=False, allow_nan=False)


def _finite(v):
    """NaN and the infinities as the strings "NaN", "Infinity", "-Infinity": JSON has no number for them."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v).replace("inf", "Infinity").replace("nan", "NaN")
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v
