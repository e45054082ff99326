"""Pure scoring of one batch: decode, validate, one model call, decide, encode. Bad records become dead letters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from .avro.codec import SMALL_BATCH, Codec, decision_codes, decision_of
from .avro.recordcodec import RecordCodec
from .model.manifest import Manifest
from .records import BatchOutcome, DeadLetter, Decision, Message, Stage, Transaction, Verdict


class Scorer(Protocol):
    """Anything with a manifest and a batch `predict`; OnnxScorer in production, fakes in tests."""

    manifest: Manifest

    def predict(self, matrix: np.ndarray) -> np.ndarray: ...


def score_batch(messages: Sequence[Message], scorer: Scorer, codec: Codec | RecordCodec, now_ms: int,
                bodies: Sequence[bytes | None | Exception] | None = None) -> BatchOutcome:
    """Score a batch with one model call; every message ends as exactly one verdict or one dead letter.

    `bodies` replaces the message values (for example without their wire-format header); an exception in it makes
    that message a `deserialize` dead letter with the exception's message.
    """
    outcome = BatchOutcome()
    if bodies is None:
        batch, decode_errors = codec.decode_batch([m.value() for m in messages])
    else:
        unread = {i: v for i, v in enumerate(bodies) if isinstance(v, Exception)}
        batch, decode_errors = codec.decode_batch([None if i in unread else v for i, v in enumerate(bodies)])
        decode_errors.update(unread)
    for i, exc in decode_errors.items():
        outcome.dead_letters.append(DeadLetter(messages[i], Stage.DESERIALIZE, type(exc).__name__, str(exc)))
    batch, _ = _without(outcome, messages, batch, None, codec.validation_errors(batch), Stage.VALIDATE)
    if not len(batch):
        return outcome
    matrix, invalid = codec.features(batch, scorer.manifest)
    batch, matrix = _without(outcome, messages, batch, matrix, invalid, Stage.VALIDATE)
    if not len(batch):
        return outcome
    probs, failures = _predict(scorer, matrix)
    if failures:
        batch, keep = _without(outcome, messages, batch, np.arange(len(batch)), failures, Stage.SCORE)
        probs = probs[keep]
    t = scorer.manifest.thresholds
    decisions = decision_codes(probs, t.review, t.decline)
    outcome.scored = [messages[i] for i in batch.rows]
    outcome.encoded = codec.encode_verdicts(batch, probs, decisions, (t.review, t.decline),
                                            (scorer.manifest.name, scorer.manifest.version), now_ms)
    outcome.decisions = decisions
    outcome.batch = batch
    outcome.event_times = batch.event_times
    outcome.typed = lambda: [_verdict(*codec.identity(batch, i), float(p), decision_of(d), scorer.manifest, now_ms)
                             for i, (p, d) in enumerate(zip(probs.tolist(), decisions.tolist()))]
    return outcome


def _without(outcome: BatchOutcome, messages: Sequence[Message], batch, rows: np.ndarray | None,
             errors: dict[int, Exception], stage: Stage):
    """Dead-letter the batch positions in `errors` at `stage`; return the batch and `rows` without them."""
    if not errors:
        return batch, rows
    for pos, exc in errors.items():
        error_class = exc.error_class if isinstance(exc, _Failure) else type(exc).__name__
        outcome.dead_letters.append(DeadLetter(messages[batch.rows[pos]], stage, error_class, str(exc)))
    keep = [pos for pos in range(len(batch)) if pos not in errors]
    return batch.take(keep), (rows[keep] if rows is not None else None)


def decide(txn: Transaction, probability: float, manifest: Manifest, now_ms: int) -> Verdict:
    """Turn a probability into a verdict with the manifest's thresholds (strictly greater than)."""
    t = manifest.thresholds
    code = int(decision_codes(np.array([probability]), t.review, t.decline)[0])
    return _verdict(txn.transaction_id, txn.card_id, txn.event_time, probability, decision_of(code), manifest, now_ms)


def _verdict(transaction_id: str, card_id: str, event_time: int, probability: float, decision: Decision,
             manifest: Manifest, now_ms: int) -> Verdict:
    t = manifest.thresholds
    return Verdict(
        transaction_id=transaction_id,
        card_id=card_id,
        fraud_probability=probability,
        is_fraud=decision is Decision.DECLINE,
        decision=decision,
        review_threshold=t.review,
        decline_threshold=t.decline,
        model_name=manifest.name,
        model_version=manifest.version,
        event_time=event_time,
        scored_at=now_ms,
    )


def _predict(scorer: Scorer, matrix: np.ndarray) -> tuple[np.ndarray, dict[int, Exception]]:
    """One model call for the batch; if it fails, score row by row so one bad row cannot sink the rest."""
    try:
        probs = _checked(scorer, matrix)
    except Exception:
        probs = None
    failures: dict[int, Exception] = {}
    if probs is None:
        probs = np.zeros(len(matrix))
        for pos in range(len(matrix)):
            try:
                one = _checked(scorer, matrix[pos:pos + 1])
                if one is None:
                    raise ValueError("model returned the wrong number of probabilities for one row")
                probs[pos] = one[0]
            except Exception as exc:
                failures[pos] = _Failure(type(exc).__name__, _first_line(exc))
    for pos in _not_probabilities(probs):
        if pos not in failures:
            failures[pos] = _Failure("InvalidProbability", f"model returned {float(probs[pos])!r}, not a probability")
    return probs, failures


def _not_probabilities(probs: np.ndarray) -> list[int]:
    """The positions of values outside [0, 1], NaN included."""
    if len(probs) <= SMALL_BATCH:
        return [pos for pos, p in enumerate(probs.tolist()) if not 0.0 <= p <= 1.0]
    return np.flatnonzero(~((probs >= 0.0) & (probs <= 1.0))).tolist()


class _Failure(Exception):
    """A row the model could not score, named as the error it raised."""

    def __init__(self, error_class: str, message: str):
        super().__init__(message)
        self.error_class = error_class


def _checked(scorer: Scorer, matrix: np.ndarray) -> np.ndarray | None:
    """The model's probabilities, or None when their shape would pair them with the wrong rows."""
    probs = np.asarray(scorer.predict(matrix), dtype=np.float64)
    return probs if probs.shape == (len(matrix),) else None


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
