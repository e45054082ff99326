"""Pure scoring of one batch: decode, validate, one model call, decide, encode. Bad records become dead letters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from .codec import Codec, TransactionBatch, decision_codes, decision_of, validation_errors
from .manifest import Manifest
from .records import BatchOutcome, DeadLetter, Decision, Message, Stage, Transaction, Verdict


class Scorer(Protocol):
    """Anything with a manifest and a batch `predict`; OnnxScorer in production, fakes in tests."""

    manifest: Manifest

    def predict(self, matrix: np.ndarray) -> np.ndarray: ...


def score_batch(messages: Sequence[Message], scorer: Scorer, codec: Codec, now_ms: int) -> BatchOutcome:
    """Score a batch with one model call; every message ends as exactly one verdict or one dead letter."""
    outcome = BatchOutcome()
    batch, decode_errors = codec.decode_batch([m.value() for m in messages])
    for i, exc in decode_errors.items():
        outcome.dead_letters.append(DeadLetter(messages[i], Stage.DESERIALIZE, type(exc).__name__, str(exc)))
    invalid = validation_errors(batch)
    for pos, exc in invalid.items():
        outcome.dead_letters.append(DeadLetter(messages[batch.rows[pos]], Stage.VALIDATE, type(exc).__name__, str(exc)))
    if invalid:
        batch = batch.take([pos for pos in range(len(batch)) if pos not in invalid])
    if not len(batch):
        return outcome
    probs, failures = _predict(scorer, batch)
    for pos, (error_class, message) in failures.items():
        outcome.dead_letters.append(DeadLetter(messages[batch.rows[pos]], Stage.SCORE, error_class, message))
    if failures:
        keep = [pos for pos in range(len(batch)) if pos not in failures]
        batch, probs = batch.take(keep), probs[keep]
    t = scorer.manifest.thresholds
    decisions = decision_codes(probs, t.review, t.decline)
    outcome.scored = [messages[i] for i in batch.rows]
    outcome.encoded = codec.encode_verdicts(batch, probs, decisions, (t.review, t.decline),
                                            (scorer.manifest.name, scorer.manifest.version), now_ms)
    outcome.decisions = decisions
    outcome.event_times = batch.event_times
    outcome.typed = lambda: [_verdict(batch.transaction(i), float(p), decision_of(d), scorer.manifest, now_ms)
                             for i, (p, d) in enumerate(zip(probs.tolist(), decisions.tolist()))]
    return outcome


def decide(txn: Transaction, probability: float, manifest: Manifest, now_ms: int) -> Verdict:
    """Turn a probability into a verdict with the manifest's thresholds (strictly greater than)."""
    t = manifest.thresholds
    code = int(decision_codes(np.array([probability]), t.review, t.decline)[0])
    return _verdict(txn, probability, decision_of(code), manifest, now_ms)


def _verdict(txn: Transaction, probability: float, decision: Decision, manifest: Manifest, now_ms: int) -> Verdict:
    t = manifest.thresholds
    return Verdict(
        transaction_id=txn.transaction_id,
        card_id=txn.card_id,
        fraud_probability=probability,
        is_fraud=decision is Decision.DECLINE,
        decision=decision,
        review_threshold=t.review,
        decline_threshold=t.decline,
        model_name=manifest.name,
        model_version=manifest.version,
        event_time=txn.event_time,
        scored_at=now_ms,
    )


def _predict(scorer: Scorer, batch: TransactionBatch) -> tuple[np.ndarray, dict[int, tuple[str, str]]]:
    """One model call for the batch; if it fails, score row by row so one bad row cannot sink the rest."""
    try:
        probs = _checked(scorer, batch)
    except Exception:
        probs = None
    if probs is None:
        probs = np.zeros(len(batch))
        failures: dict[int, tuple[str, str]] = {}
        for pos in range(len(batch)):
            try:
                one = _checked(scorer, batch.take([pos]))
                if one is None:
                    raise ValueError("model returned the wrong number of probabilities for one row")
                probs[pos] = one[0]
            except Exception as exc:
                failures[pos] = (type(exc).__name__, _first_line(exc))
    else:
        failures = {}
    for pos in np.flatnonzero(~((probs >= 0.0) & (probs <= 1.0))):
        if int(pos) not in failures:
            failures[int(pos)] = ("InvalidProbability", f"model returned {float(probs[pos])!r}, not a probability")
    return probs, failures


def _checked(scorer: Scorer, batch: TransactionBatch) -> np.ndarray | None:
    """The model's probabilities, or None when their shape would pair them with the wrong rows."""
    probs = np.asarray(scorer.predict(scorer.manifest.matrix(batch.column, len(batch))), dtype=np.float64)
    return probs if probs.shape == (len(batch),) else None


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
