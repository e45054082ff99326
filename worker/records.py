"""Typed records that flow through the worker: messages, transactions, verdicts, dead letters."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from collections.abc import Callable
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

    @property
    def verdicts(self) -> list[tuple[Message, Verdict]]:
        """(message, Verdict) pairs, built on demand: the worker's hot path only needs `encoded`."""
        return list(zip(self.scored, self.typed()))


def dead_letter_headers(dl: DeadLetter, group_id: str, worker_id: str, failed_at_ms: int) -> Headers:
    """The original headers plus string headers, Kafka Connect style, that say why and where it failed."""
    msg = dl.message
    ours = {
        "fraud.errors.stage": dl.stage.value,
        "fraud.errors.exception.class.name": dl.error_class,
        "fraud.errors.exception.message": dl.error_message,
        "fraud.errors.topic": msg.topic() or "",
        "fraud.errors.partition": str(msg.partition()),
        "fraud.errors.offset": str(msg.offset()),
        "fraud.errors.group.id": group_id,
        "fraud.errors.worker.id": worker_id,
        "fraud.errors.timestamp": str(failed_at_ms),
    }
    return list(msg.headers() or []) + [(k, v.encode()) for k, v in ours.items()]
