"""Typed records that flow through the worker: messages, transactions, verdicts, dead letters."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

Headers = list[tuple[str, bytes | None]]


class Message(Protocol):
    """What the core needs of a consumed Kafka record; confluent_kafka.Message satisfies it as is."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def headers(self) -> Headers | None: ...
    def timestamp(self) -> tuple[int, int]: ...


@dataclass(frozen=True, slots=True)
class Envelope:
    """A consumed record as plain data, for tests and tools; it implements `Message`."""

    topic_: str
    partition_: int
    offset_: int
    key_: bytes | None
    value_: bytes | None
    headers_: Headers | None = None
    timestamp_ms: int = 0

    def topic(self) -> str:
        return self.topic_

    def partition(self) -> int:
        return self.partition_

    def offset(self) -> int:
        return self.offset_

    def key(self) -> bytes | None:
        return self.key_

    def value(self) -> bytes | None:
        return self.value_

    def headers(self) -> Headers | None:
        return self.headers_

    def timestamp(self) -> tuple[int, int]:
        return (1, self.timestamp_ms)


@dataclass(frozen=True, slots=True)
class Transaction:
    """One card transaction, as typed in schemas/transaction.avsc."""

    transaction_id: str
    card_id: str
    amount: float
    event_time: int
    distance_from_home: float
    distance_from_last_transaction: float
    ratio_to_median_purchase_price: float
    repeat_retailer: bool
    used_chip: bool
    used_pin_number: bool
    online_order: bool


class Decision(str, Enum):
    """What the business does with a transaction."""

    APPROVE = "APPROVE"
    REVIEW = "REVIEW"
    DECLINE = "DECLINE"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The fraud verdict for one transaction, as typed in schemas/verdict.avsc."""

    transaction_id: str
    card_id: str
    fraud_probability: float
    is_fraud: bool
    decision: Decision
    review_threshold: float
    decline_threshold: float
    model_name: str
    model_version: str
    event_time: int
    scored_at: int
    attributes: dict[str, str] = field(default_factory=dict)


class Stage(str, Enum):
    """Where a message failed; written to the dead-letter header."""

    DESERIALIZE = "deserialize"
    VALIDATE = "validate"
    SCORE = "score"
    PRODUCE = "produce"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be scored, with the reason."""

    message: Message
    stage: Stage
    error_class: str
    error_message: str


@dataclass(slots=True)
class BatchOutcome:
    """What scoring one batch produced: encoded verdicts for the scored messages, and dead letters."""

    scored: list[Message] = field(default_factory=list)
    encoded: list[bytes] = field(default_factory=list)
    decisions: Any = None  # numpy array of decision codes 0/1/2, one per scored message
    event_times: Any = None  # numpy array of event times (epoch ms), one per scored message
    dead_letters: list[DeadLetter] = field(default_factory=list)
    typed: Callable[[], list[Verdict]] = list
    batch: Any = None  # the decoded records of the scored messages, in order, for a challenger's features

    @property
    def verdicts(self) -> list[tuple[Message, Verdict]]:
        """(message, Verdict) pairs, built on demand: the worker's hot path only needs `encoded`."""
        return list(zip(self.scored, self.typed()))


# librdkafka error strings can carry a whole broker message; a header this long still says why.
_MAX_REASON_CHARS = 1000
# Longer keys are replaced by their digest when a dead letter must be adjusted to land.
MAX_ADJUSTED_KEY_BYTES = 64


def dead_letter_headers(dl: DeadLetter, group_id: str, worker_id: str, failed_at_ms: int) -> Headers:
    """The original headers plus string headers, Kafka Connect style, that say why and where it failed."""
    original, readable = _original_headers(dl.message)
    unreadable = [] if readable else [("fraud.errors.original.headers.unreadable", b"true")]
    return original + _error_headers(dl, group_id, worker_id, failed_at_ms) + unreadable


def _original_headers(msg: Message) -> tuple[Headers, bool]:
    """The record's headers, and whether they could be read (a header name that is not UTF-8 cannot)."""
    try:
        return list(msg.headers() or []), True
    except (UnicodeDecodeError, ValueError):
        return [], False


def _error_headers(dl: DeadLetter, group_id: str, worker_id: str, failed_at_ms: int) -> Headers:
    msg = dl.message
    ours = {
        "fraud.errors.stage": dl.stage.value,
        "fraud.errors.exception.class.name": dl.error_class,
        "fraud.errors.exception.message": dl.error_message[:_MAX_REASON_CHARS],
        "fraud.errors.topic": msg.topic() or "",
        "fraud.errors.partition": str(msg.partition()),
        "fraud.errors.offset": str(msg.offset()),
        "fraud.errors.group.id": group_id,
        "fraud.errors.worker.id": worker_id,
        "fraud.errors.timestamp": str(failed_at_ms),
    }
    return [(k, v.encode(errors="replace")) for k, v in ours.items()]


@dataclass(frozen=True, slots=True)
class Adjusted:
    """A dead letter reduced to what any topic accepts, when the original was refused."""

    key: bytes
    value: None
    headers: Headers
    timestamp_ms: int  # 0: the broker's time


def adjusted_dead_letter(dl: DeadLetter, refusal: str, group_id: str, worker_id: str, failed_at_ms: int) -> Adjusted:
    """The dead letter without value, original headers and timestamp, and with a short key; headers say what changed.

    The key becomes `sha256:<hex>` of the original when longer than MAX_ADJUSTED_KEY_BYTES, or the source
    coordinates `topic/partition/offset` when there was none (a compacted topic refuses a null key).
    """
    msg = dl.message
    key, value, (headers, _) = msg.key(), msg.value(), _original_headers(msg)
    changed = {"fraud.errors.dead.letter.refused": refusal[:_MAX_REASON_CHARS], "fraud.errors.adjusted": []}

    def note(what: str, **facts: object) -> None:
        changed["fraud.errors.adjusted"].append(what)
        changed.update({f"fraud.errors.original.{k.replace('_', '.')}": str(v) for k, v in facts.items()})

    if value is not None:
        note("value.dropped", value_bytes=len(value))
    if key is None:
        key = f"{msg.topic()}/{msg.partition()}/{msg.offset()}".encode()
        note("key.coordinates", key="null")
    elif len(key) > MAX_ADJUSTED_KEY_BYTES:
        note("key.digest", key_bytes=len(key))
        key = b"sha256:" + hashlib.sha256(key).hexdigest().encode()
    if headers:
        note("headers.dropped", headers_count=len(headers))
    ts_type, ts = msg.timestamp()
    note("timestamp.replaced", timestamp=ts if ts_type else "none")
    changed["fraud.errors.adjusted"] = ",".join(changed["fraud.errors.adjusted"])
    extra = [(k, str(v).encode()) for k, v in changed.items()]
    return Adjusted(key, None, _error_headers(dl, group_id, worker_id, failed_at_ms) + extra, 0)
