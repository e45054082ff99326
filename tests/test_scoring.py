"""Tests for score_batch and decide with a fake scorer, and for the dead-letter headers."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from tests.fakes import CODEC, DECLINE, REVIEW, FakeScorer, make_manifest, make_message, make_txn, txn_message
from worker.records import DeadLetter, Decision, Envelope, Stage, adjusted_dead_letter, dead_letter_headers
from worker.scoring import decide, score_batch

NOW = 1_800_000_000_000


def score(messages, scorer):
    """Score `messages` and check that each one ended as exactly one verdict or one dead letter."""
    outcome = score_batch(messages, scorer, CODEC, NOW)
    ended = [m for m, _ in outcome.verdicts] + [d.message for d in outcome.dead_letters]
    assert sorted(map(id, ended)) == sorted(map(id, messages))
    return outcome


def stages(outcome) -> dict[int, Stage]:
    """Offset -> stage of each dead letter."""
    return {d.message.offset(): d.stage for d in outcome.dead_letters}


def test_one_model_call_per_batch():
    """A batch of good messages is scored with a single predict call over all of them."""
    scorer = FakeScorer()
    outcome = score([txn_message(i, amount=0.125) for i in range(50)], scorer)
    assert scorer.calls == [50]
    assert len(outcome.verdicts) == 50 and not outcome.dead_letters


def test_empty_and_all_poison_batches_call_no_model():
    """A batch with nothing scorable makes no model call and still accounts for every message."""
    scorer = FakeScorer()
    assert not score([], scorer).verdicts
    outcome = score([make_message(b"junk", offset=0), make_message(None, offset=1)], scorer)
    assert scorer.calls == [] and len(outcome.dead_letters) == 2


def test_each_poison_gets_its_stage():
    """Undecodable messages are `deserialize`, invalid ones `validate`, and good ones in between are scored once."""
    scorer = FakeScorer()
    messages = [
        make_message(None, offset=0),
        make_message(b"\x00\x01\x02", offset=1),
        txn_message(2),
        txn_message(3, amount=float("nan")),
        txn_message(4, card_id=""),
        txn_message(5, event_time=0),
        make_message(CODEC.encode_transaction(make_txn()) + b"\x00", offset=6),
        txn_message(7),
    ]
    outcome = score(messages, scorer)
    assert stages(outcome) == {0: Stage.DESERIALIZE, 1: Stage.DESERIALIZE, 3: Stage.VALIDATE, 4: Stage.VALIDATE,
                               5: Stage.VALIDATE, 6: Stage.DESERIALIZE}
    assert [m.offset() for m, _ in outcome.verdicts] == [2, 7]
    assert {d.error_class for d in outcome.dead_letters} == {"DecodeError", "ValidationError"}
    assert scorer.calls == [2]


def test_batch_failure_falls_back_to_rows():
    """When predict fails for the batch, rows are scored one by one and only the failing row is a `score` dead letter."""
    scorer = FakeScorer(fail_on={0.375})
    messages = [txn_message(0, amount=0.125), txn_message(1, amount=0.375), txn_message(2, amount=0.625)]
    outcome = score(messages, scorer)
    assert scorer.calls == [3, 1, 1, 1]
    assert stages(outcome) == {1: Stage.SCORE}
    (dead,) = outcome.dead_letters
    assert dead.error_class == "RuntimeError" and dead.error_message == "fake model cannot score amount(s)"
    assert [(m.offset(), v.fraud_probability) for m, v in outcome.verdicts] == [(0, 0.125), (2, 0.625)]


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.25, float("inf")])
def test_out_of_range_probability_is_score_dead_letter(bad):
    """A NaN, infinite, negative or >1 probability makes that row, and only it, a `score` dead letter."""
    scorer = FakeScorer(probabilities={0.375: bad})
    outcome = score([txn_message(0, amount=0.125), txn_message(1, amount=0.375)], scorer)
    assert stages(outcome) == {1: Stage.SCORE}
    assert outcome.dead_letters[0].error_class == "InvalidProbability"
    assert [m.offset() for m, _ in outcome.verdicts] == [0]


@pytest.mark.parametrize(
    "returned, verdicts",
    [([0.5], 2), ([0.5, 0.5, 0.5], 0), ([[0.5], [0.5]], 0)],
    ids=["one-value", "three-values", "2-d"],
)
def test_wrong_shaped_predictions_lose_no_message(returned, verdicts):
    """A scorer whose output does not fit the batch is retried row by row; rows it still does not fit are `score` dead letters."""

    class WrongShape(FakeScorer):
        def predict(self, matrix):
            self.calls.append(len(matrix))
            return np.array(returned)

    scorer = WrongShape()
    outcome = score([txn_message(0), txn_message(1)], scorer)
    assert scorer.calls == [2, 1, 1]
    assert [v.fraud_probability for _, v in outcome.verdicts] == [0.5] * verdicts
    assert stages(outcome) == {i: Stage.SCORE for i in range(2 - verdicts)}


@pytest.mark.parametrize(
    "probability, decision",
    [
        (0.0, Decision.APPROVE),
        (REVIEW, Decision.APPROVE),
        (np.nextafter(REVIEW, 1.0), Decision.REVIEW),
        (DECLINE, Decision.REVIEW),
        (np.nextafter(DECLINE, 1.0), Decision.DECLINE),
        (1.0, Decision.DECLINE),
    ],
)
def test_decide_thresholds_are_strictly_greater(probability, decision):
    """A probability equal to a threshold stays below it; only a strictly greater one moves up, and DECLINE is is_fraud."""
    verdict = decide(make_txn(), float(probability), make_manifest(), NOW)
    assert verdict.decision is decision
    assert verdict.is_fraud is (decision is Decision.DECLINE)


def test_score_batch_decisions_at_thresholds():
    """Through score_batch, probabilities at and just above each threshold get APPROVE, REVIEW, REVIEW, DECLINE."""
    amounts = [REVIEW, REVIEW + 2**-20, DECLINE, DECLINE + 2**-20]  # exact in float32, as the feature matrix is
    outcome = score([txn_message(i, amount=a) for i, a in enumerate(amounts)], FakeScorer())
    assert [(v.decision, v.is_fraud) for _, v in outcome.verdicts] == [
        (Decision.APPROVE, False), (Decision.REVIEW, False), (Decision.REVIEW, False), (Decision.DECLINE, True)]


def test_verdict_fields_come_from_transaction_and_manifest():
    """A verdict copies ids and event time from its transaction, thresholds, name and version from the manifest."""
    manifest = make_manifest(name="m-x", version="7", thresholds={"review": 0.25, "decline": 0.875})
    txn = make_txn(transaction_id="tx-77", card_id="card-9", event_time=1_650_000_000_000, amount=0.5)
    msg = make_message(CODEC.encode_transaction(txn), offset=3)
    ((scored, verdict),) = score([msg], FakeScorer(manifest=manifest)).verdicts
    assert scored is msg
    assert (verdict.transaction_id, verdict.card_id, verdict.event_time) == ("tx-77", "card-9", 1_650_000_000_000)
    assert (verdict.review_threshold, verdict.decline_threshold) == (0.25, 0.875)
    assert (verdict.model_name, verdict.model_version, verdict.scored_at) == ("m-x", "7", NOW)
    assert (verdict.fraud_probability, verdict.decision, verdict.is_fraud) == (0.5, Decision.REVIEW, False)


def test_dead_letter_headers_keep_originals_and_add_ours():
    """Dead-letter headers keep the original headers first, then add our string headers with the right values."""
    original = [("trace-id", b"abc"), ("empty", None), ("trace-id", b"def")]
    msg = make_message(b"junk", offset=41, partition=3, headers=original)
    dl = DeadLetter(msg, Stage.VALIDATE, "ValidationError", "amount is négative")
    headers = dead_letter_headers(dl, group_id="fraud-grp", worker_id="w-1", failed_at_ms=1_700_000_000_999)
    assert headers[:3] == original
    ours = dict(headers[3:])
    assert ours == {
        "fraud.errors.stage": b"validate",
        "fraud.errors.exception.class.name": b"ValidationError",
        "fraud.errors.exception.message": "amount is négative".encode(),
        "fraud.errors.topic": b"transactions",
        "fraud.errors.partition": b"3",
        "fraud.errors.offset": b"41",
        "fraud.errors.group.id": b"fraud-grp",
        "fraud.errors.worker.id": b"w-1",
        "fraud.errors.timestamp": b"1700000000999",
    }
    assert len(headers) == 3 + len(ours)


def test_dead_letter_headers_without_original_headers():
    """A message without headers gets only our headers."""
    dl = DeadLetter(make_message(b"junk", offset=0), Stage.DESERIALIZE, "DecodeError", "bad")
    headers = dead_letter_headers(dl, "g", "w", 0)
    assert [k for k, _ in headers][0] == "fraud.errors.stage" and len(headers) == 9


class _UnreadableHeaders:
    """A consumed record whose header names are not UTF-8: confluent_kafka raises when they are read."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def headers(self):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")


def test_dead_letter_headers_survive_unreadable_original_headers():
    """Header names that are not UTF-8 are left out and flagged, instead of stopping the dead letter."""
    dl = DeadLetter(_UnreadableHeaders(make_message(b"junk")), Stage.DESERIALIZE, "DecodeError", "bad")
    headers = dict(dead_letter_headers(dl, "g", "w", 0))
    assert headers["fraud.errors.original.headers.unreadable"] == b"true" and headers["fraud.errors.stage"] == b"deserialize"


@pytest.mark.parametrize("key, expected_key, change", [
    (b"card-1", b"card-1", None),
    (b"k" * 65, b"sha256:" + hashlib.sha256(b"k" * 65).hexdigest().encode(), "key.digest"),
    (None, b"transactions/3/41", "key.coordinates"),
])
def test_adjusted_dead_letter_keeps_the_reason_and_says_what_changed(key, expected_key, change):
    """An adjusted dead letter drops value, original headers and timestamp, shortens the key, and lists each change."""
    msg = Envelope("transactions", 3, 41, key, b"v" * 5000, [("trace", b"t")], 1_600_000_000_000)
    dl = DeadLetter(msg, Stage.DESERIALIZE, "DecodeError", "x" * 5000)
    adj = adjusted_dead_letter(dl, "Broker: Message size too large", "g", "w", 7)
    headers = dict(adj.headers)
    assert adj.key == expected_key and adj.value is None and adj.timestamp_ms == 0
    changes = headers["fraud.errors.adjusted"].decode().split(",")
    assert changes[0] == "value.dropped" and {"headers.dropped", "timestamp.replaced"} <= set(changes)
    assert (change in changes) if change else not any(c.startswith("key.") for c in changes)
    assert headers["fraud.errors.original.value.bytes"] == b"5000"
    assert headers["fraud.errors.original.timestamp"] == b"1600000000000"
    assert headers["fraud.errors.dead.letter.refused"] == b"Broker: Message size too large"
    assert headers["fraud.errors.offset"] == b"41" and len(headers["fraud.errors.exception.message"]) == 1000
    assert "trace" not in headers
