"""Pure scoring of one batch: decode, validate, one model call, decide. Bad records become dead letters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from .codec import Codec, DecodeError, ValidationError, validate
from .manifest import Manifest
from .records import BatchOutcome, DeadLetter, Decision, Message, Stage, Transaction, Verdict


class Scorer(Protocol):
    """Anything with a manifest and a batch `predict`; OnnxScorer in production, fakes in tests."""

    manifest: Manifest

    def predict(self, matrix: np.ndarray) -> np.ndarray: ...


def score_batch(messages: Sequence[Message], scorer: Scorer, codec: Codec, now_ms: int) -> BatchOutcome:
    """Score a batch with one model call; every message ends as exactly one verdict or one dead letter."""
    outcome = BatchOutcome()
    good: list[Message] = []
    txns: list[Transaction] = []
    for msg in messages:
        try:
            txn = codec.decode_transaction(msg.value())
            validate(txn)
        except DecodeError as exc:
            outcome.dead_letters.append(DeadLetter(msg, Stage.DESERIALIZE, type(exc).__name__, str(exc)))
            continue
        except ValidationError as exc:
            outcome.dead_letters.append(DeadLetter(msg, Stage.VALIDATE, type(exc).__name__, str(exc)))
            continue
        good.append(msg)
        txns.append(txn)
    if not txns:
        return outcome
    manifest = scorer.manifest
    for msg, txn, prob in zip(good, txns, _predict(scorer, txns)):
        if isinstance(prob, Exception):
            outcome.dead_letters.append(DeadLetter(msg, Stage.SCORE, type(prob).__name__, _first_line(prob)))
        elif not 0.0 <= prob <= 1.0:
            outcome.dead_letters.append(
                DeadLetter(msg, Stage.SCORE, "InvalidProbability", f"model returned {prob!r}, not a probability")
            )
        else:
            outcome.verdicts.append((msg, decide(txn, prob, manifest, now_ms)))
    return outcome


def decide(txn: Transaction, probability: float, manifest: Manifest, now_ms: int) -> Verdict:
    """Turn a probability into a verdict with the manifest's thresholds (strictly greater than)."""
    t = manifest.thresholds
    if probability > t.decline:
        decision = Decision.DECLINE
    elif probability > t.review:
        decision = Decision.REVIEW
    else:
        decision = Decision.APPROVE
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


def _predict(scorer: Scorer, txns: list[Transaction]) -> list[float | Exception]:
    """One model call for the batch; if it fails, score row by row so one bad row cannot sink the rest."""
    try:
        probs = np.asarray(scorer.predict(scorer.manifest.feature_matrix(txns)), dtype=np.float64)
        if probs.shape == (len(txns),):  # anything else would pair probabilities with the wrong rows, or drop rows
            return probs.tolist()
    except Exception:
        pass
    results: list[float | Exception] = []
    for txn in txns:
        try:
            prob = np.asarray(scorer.predict(scorer.manifest.feature_matrix([txn])), dtype=np.float64)
            if prob.shape != (1,):
                raise ValueError(f"model returned shape {prob.shape} for one row, expected (1,)")
            results.append(float(prob[0]))
        except Exception as exc:
            results.append(exc)
    return results


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


__all__ = ["Scorer", "decide", "score_batch"]
