"""Delivery-report identity: each record's report reaches its own batch and index, across the ring's wrap."""

from __future__ import annotations

import pytest

from worker.kafka import DeliverySlots


def test_each_report_names_its_batch_and_index_across_the_wrap():
    """Batches claimed past the end of the ring still map every callback to (batch, index), whatever the report order."""
    slots = DeliverySlots(capacity=6)
    seen = []

    def claim(name: str, n: int) -> list:
        return slots.claim(lambda i, err: seen.append((name, i, err)), n)

    a = claim("a", 4)  # slots 0..3
    for i in (2, 0, 3, 1):
        a[i](None, object())
    b = claim("b", 4)  # slots 4, 5, 0, 1: wraps
    c = claim("c", 2)  # slots 2, 3, while b is in flight
    for name, i in (("b", 3), ("c", 1), ("b", 0), ("c", 0), ("b", 2), ("b", 1)):
        (b if name == "b" else c)[i]("refused" if (name, i) == ("b", 3) else None, object())
    assert seen == [("a", 2, None), ("a", 0, None), ("a", 3, None), ("a", 1, None), ("b", 3, "refused"),
                    ("c", 1, None), ("b", 0, None), ("c", 0, None), ("b", 2, None), ("b", 1, None)]


def test_a_batch_larger_than_the_ring_is_refused():
    """A claim that would reuse a slot within the same batch raises instead of confusing two records."""
    with pytest.raises(ValueError, match="exceeds"):
        DeliverySlots(capacity=4).claim(lambda i, err: None, 5)
