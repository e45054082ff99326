"""Tests for OffsetTracker: commit positions follow the fully acknowledged prefix of each partition."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.offsets import OffsetTracker

A, B = ("transactions", 0), ("transactions", 1)


def ack_all(tracker: OffsetTracker, s, times: int) -> None:
    """Acknowledge `times` outputs of slice `s`."""
    for _ in range(times):
        tracker.ack(s)


def test_nothing_to_commit_until_a_slice_completes():
    """A slice with outputs still unacknowledged gives no commit position."""
    t = OffsetTracker()
    s = t.open(A, last_offset=9, outstanding=3)
    ack_all(t, s, 2)
    assert t.to_commit() == {} and t.in_flight() == 1
    t.ack(s)
    assert t.to_commit() == {A: 10} and t.in_flight() == 0


def test_out_of_order_acks_commit_the_contiguous_prefix():
    """A later slice completing first commits nothing; when the earlier one completes, both are committed at once."""
    t = OffsetTracker()
    first, second, third = t.open(A, 4, 2), t.open(A, 9, 1), t.open(A, 14, 1)
    t.ack(second)
    assert t.to_commit() == {}
    ack_all(t, first, 2)
    assert t.to_commit() == {A: 10}
    t.ack(third)
    assert t.to_commit() == {A: 15}


def test_incomplete_slice_blocks_later_ones_forever():
    """A slice that never completes keeps every later, completed slice of its partition from being committed."""
    t = OffsetTracker()
    stuck, later = t.open(A, 4, 2), t.open(A, 9, 1)
    t.ack(stuck)
    t.ack(later)
    assert t.to_commit() == {} and t.safe_positions() == {} and t.in_flight() == 2


def test_partitions_are_independent():
    """A stuck slice on one partition does not hold back another partition."""
    t = OffsetTracker()
    t.open(A, 4, 1)
    t.ack(t.open(B, 7, 1))
    assert t.to_commit() == {B: 8}


def test_to_commit_returns_only_advanced_positions():
    """A position is returned once; it is returned again only after it advances."""
    t = OffsetTracker()
    t.ack(t.open(A, 4, 1))
    t.ack(t.open(B, 2, 1))
    assert t.to_commit() == {A: 5, B: 3}
    assert t.to_commit() == {}
    t.ack(t.open(A, 6, 1))
    assert t.to_commit() == {A: 7}
    assert t.safe_positions() == {A: 7, B: 3}


def test_to_commit_filters_by_partition():
    """to_commit(tps) returns and marks only the given partitions, leaving the others for later."""
    t = OffsetTracker()
    t.ack(t.open(A, 4, 1))
    t.ack(t.open(B, 2, 1))
    assert t.to_commit({A}) == {A: 5}
    assert t.to_commit() == {B: 3}


def test_uncommit_offers_positions_again():
    """After a failed commit, uncommit makes the same positions come back from to_commit."""
    t = OffsetTracker()
    t.ack(t.open(A, 4, 1))
    positions = t.to_commit()
    t.uncommit(positions)
    assert t.to_commit() == {A: 5}


def test_uncommit_of_a_superseded_position_is_ignored():
    """Uncommitting an older position after a newer one was handed out does not re-offer anything."""
    t = OffsetTracker()
    t.ack(t.open(A, 4, 1))
    old = t.to_commit()
    t.ack(t.open(A, 8, 1))
    assert t.to_commit() == {A: 9}
    t.uncommit(old)
    assert t.to_commit() == {}


def test_forget_drops_partitions():
    """Forgotten partitions lose their slices and positions; others are kept."""
    t = OffsetTracker()
    t.open(A, 4, 1)
    t.ack(t.open(B, 2, 1))
    t.forget({A, B})
    assert t.in_flight() == 0 and t.safe_positions() == {} and t.to_commit() == {}


def test_late_ack_after_forget_is_harmless():
    """Acks of a forgotten slice neither raise nor create a position, even after the partition comes back."""
    t = OffsetTracker()
    old = t.open(A, 4, 1)
    t.forget({A})
    t.ack(old)
    assert t.to_commit() == {}
    new = t.open(A, 2, 2)  # re-assigned, re-read from the last commit
    t.ack(old)
    assert t.to_commit() == {} and t.in_flight() == 1
    ack_all(t, new, 2)
    assert t.to_commit() == {A: 3}


@pytest.mark.parametrize("last_offset", [4, 3])
def test_out_of_order_open_raises(last_offset):
    """Opening a slice at or before the previous slice's last offset raises ValueError."""
    t = OffsetTracker()
    t.open(A, 4, 1)
    with pytest.raises(ValueError, match="out of order"):
        t.open(A, last_offset, 1)


def test_went_back_spots_offsets_before_what_was_opened_or_acknowledged():
    """A batch starting before an open slice's end or before the safe position went back; the next offset did not."""
    t = OffsetTracker()
    assert not t.went_back(A, 0)
    s = t.open(A, 9, 1)
    assert t.went_back(A, 9) and t.went_back(A, 0) and not t.went_back(A, 10) and not t.went_back(B, 0)
    t.ack(s)
    assert t.went_back(A, 3) and not t.went_back(A, 10)
    t.forget({A})
    assert not t.went_back(A, 0)


@st.composite
def batches_and_ack_order(draw):
    """Per partition, consecutive slices of 1..5 messages from a random start; plus a random order of all message acks."""
    slices = []  # (tp, first_offset, last_offset)
    for tp in draw(st.sets(st.sampled_from([A, B, ("other", 0)]), min_size=1)):
        start = draw(st.integers(0, 1000))
        for size in draw(st.lists(st.integers(1, 5), min_size=1, max_size=8)):
            slices.append((tp, start, start + size - 1))
            start += size
    acks = [(i, offset) for i, (_, first, last) in enumerate(slices) for offset in range(first, last + 1)]
    return slices, draw(st.permutations(acks)), draw(st.lists(st.booleans(), min_size=len(acks), max_size=len(acks)))


@settings(max_examples=300, deadline=None, database=None)
@given(batches_and_ack_order())
def test_commit_never_passes_an_unacknowledged_offset(case):
    """For any interleaving of acks, the committed position never exceeds the first unacknowledged offset, and reaches the end once all are acked."""
    slices, acks, commit_after = case
    t = OffsetTracker()
    handles = [t.open(tp, last, last - first + 1) for tp, first, last in slices]
    unacked = {(slices[i][0], offset) for i, offset in acks}
    committed = {}
    for (i, offset), do_commit in zip(acks, commit_after):
        t.ack(handles[i])
        unacked.discard((slices[i][0], offset))
        if do_commit:
            for tp, pos in t.to_commit().items():
                assert pos > committed.get(tp, -1)
                committed[tp] = pos
        for tp, pos in t.safe_positions().items():
            pending = [o for p, o in unacked if p == tp]
            assert not pending or pos <= min(pending)
    committed.update(t.to_commit())
    ends = {}
    for tp, _, last in slices:
        ends[tp] = max(ends.get(tp, 0), last + 1)
    assert committed == ends and t.in_flight() == 0


def test_commit_result_names_the_partitions_that_failed():
    """A commit with no overall error but one partition refused (its coordinator still loading) reports that
    partition's error and only its position, so the worker offers just that position again."""
    from confluent_kafka import KafkaError

    from worker.kafka import _commit_result

    class Part:
        def __init__(self, partition, offset, error=None):
            self.topic, self.partition, self.offset, self.error = "tx", partition, offset, error

    loading = KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)
    err, positions = _commit_result(None, [Part(0, 10), Part(1, 20, loading), Part(2, 30)])
    assert err is loading and positions == {("tx", 1): 20}
    assert _commit_result(None, [Part(0, 10), Part(1, 20)]) == (None, {("tx", 0): 10, ("tx", 1): 20})
