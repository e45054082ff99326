"""Metrics fed a batch at a time agree with prometheus-client fed one value at a time."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from worker.metrics import _LATENCY_BUCKETS, BulkHistogram, Metrics
from worker.records import BatchOutcome


def _samples(registry: CollectorRegistry, name: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in registry.collect() for s in m.samples
            if s.name.startswith(name) and not s.name.endswith("_created")}


def test_bulk_histogram_counts_as_prometheus_client_does_in_small_and_large_batches():
    """Values on, between and beyond the bounds land in the same buckets, whichever path counts them."""
    rng = np.random.default_rng(7)
    bounds = np.array(_LATENCY_BUCKETS)
    values = np.concatenate([bounds, np.nextafter(bounds, 0), np.nextafter(bounds, 1e9), [0.0, 1e6],
                             rng.exponential(0.3, 500)])
    bulk_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram("h", "h", _LATENCY_BUCKETS, bulk_registry)
    reference = Histogram("h", "h", buckets=_LATENCY_BUCKETS, registry=reference_registry)
    for size in (1, 3, 16, 17, 200):  # both sides of the small-batch threshold
        for chunk in np.array_split(values, max(1, len(values) // size)):
            bulk.observe_many(chunk)
        for v in values:
            reference.observe(float(v))
    got, want = _samples(bulk_registry, "h"), _samples(reference_registry, "h")
    assert {k: v for k, v in got.items() if not k[0].endswith("_sum")} == \
        {k: v for k, v in want.items() if not k[0].endswith("_sum")}
    assert abs(got[("h_sum", ())] - want[("h_sum", ())]) <= 1e-9 * want[("h_sum", ())]


def test_fraud_rate_is_the_share_of_declines_among_acknowledged_verdicts():
    """The gauge is computed when scraped, from the verdicts counted so far (0 before any)."""
    m = Metrics()
    assert b"fraud_worker_fraud_rate 0.0" in generate_latest(m.registry)
    outcome = BatchOutcome(scored=[object()] * 4, decisions=np.array([0, 2, 1, 2]),
                           event_times=np.array([0.0] * 4))
    m.batch_acked(outcome, {1}, [], now=1.0)  # the refused DECLINE is not a verdict
    assert b"fraud_worker_fraud_rate 0.3333333333333333" in generate_latest(m.registry)
