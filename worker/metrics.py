"""Prometheus metrics and the /metrics, /healthz and /readyz server."""

from __future__ import annotations

import json
import threading
import time
from bisect import bisect_left
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import HistogramMetricFamily

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Batches up to this size are counted value by value in Python.
_FEW = 16
_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class Metrics:
    """The worker's metrics, in a registry of their own so several workers can live in one process."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.consumed = Counter("fraud_worker_transactions_consumed", "Messages consumed from the input topic.", registry=r)
        self.verdicts = Counter("fraud_worker_verdicts", "Verdicts acknowledged by the broker.", ["decision"], registry=r)
        self.dead_letters = Counter("fraud_worker_dead_letters", "Dead letters acknowledged by the broker.", ["stage"], registry=r)
        self.refusals = Counter("fraud_worker_output_refusals", "Outputs the broker or client refused, by what was sent next.",
                                ["kind", "then"], registry=r)
        self.batch_size = Histogram("fraud_worker_batch_size", "Messages per scored batch.", buckets=_BATCH_BUCKETS, registry=r)
        self.inference = Histogram("fraud_worker_batch_seconds", "Time to decode, score and encode one batch.", registry=r)
        self.end_to_end = BulkHistogram(
            "fraud_worker_end_to_end_seconds", "Event time to verdict acknowledged.", _LATENCY_BUCKETS, registry=r
        )
        self.lag = Gauge("fraud_worker_consumer_lag", "Messages behind the end of each assigned partition.", ["topic", "partition"], registry=r)
        self.commits = Counter("fraud_worker_commits", "Offset commits sent.", registry=r)
        self.commit_failures = Counter("fraud_worker_commit_failures", "Offset commits that failed.", registry=r)
        self.aborts = Counter("fraud_worker_transactions_aborted", "Transactions aborted (exactly-once), by reason.",
                              ["reason"], registry=r)
        self.fraud_rate = Gauge("fraud_worker_fraud_rate", "Share of verdicts with is_fraud since start.", registry=r)
        self.assigned = Gauge("fraud_worker_assigned_partitions", "Input partitions assigned to this worker.", registry=r)
        self.model = Info("fraud_worker_model", "The live model: name, version, sha256.", registry=r)
        self.model_loads = Counter("fraud_worker_model_loads", "Changed manifests loaded while running, by role "
                                   "(live, challenger) and result (swapped, refused).", ["role", "result"], registry=r)
        self.challenger = Info("fraud_worker_challenger", "The challenger model scored in shadow.", registry=r)
        self.challenger_decisions = Counter(
            "fraud_worker_challenger_decisions", "Transactions scored by both models, by live and challenger decision "
            "and the challenger's version.", ["live", "challenger", "version"], registry=r)
        self.challenger_agreement = Gauge("fraud_worker_challenger_agreement",
                                          "Share of transactions scored by both models with the same decision.",
                                          registry=r)
        self.challenger_seconds = Histogram("fraud_worker_challenger_seconds",
                                            "Time the challenger adds to one batch (features, model, shadow verdicts).",
                                            registry=r)
        self.challenger_failures = Counter("fraud_worker_challenger_failures",
                                           "Challenger failures, by stage (load, score, shadow).", ["stage"], registry=r)
        self._verdict_count = 0
        self._fraud_count = 0
        self._by_decision = [self.verdicts.labels(name) for name in ("APPROVE", "REVIEW", "DECLINE")]
        self.fraud_rate.set_function(lambda: self._fraud_count / self._verdict_count if self._verdict_count else 0.0)

    def batch_acked(self, outcome, refused: set[int], dead_letter_stages: list[str], now: float) -> None:
        """Count a batch whose every output the broker acknowledged (`refused` verdicts became dead letters)."""
        decisions, event_times = outcome.decisions, outcome.event_times
        if refused:
            keep = np.ones(len(outcome.scored), dtype=bool)
            keep[list(refused)] = False
            decisions, event_times = decisions[keep], event_times[keep]
        if decisions is not None and len(decisions):  # None: nothing in the batch was scored
            counts = np.bincount(decisions, minlength=3).tolist()
            for child, count in zip(self._by_decision, counts):
                if count:
                    child.inc(count)
            self._verdict_count += sum(counts)
            self._fraud_count += counts[2]
            self.end_to_end.observe_many(np.maximum(0.0, now - event_times / 1000.0))
        for stage in dead_letter_stages:
            self.dead_letters.labels(stage).inc()


class BulkHistogram:
    """A Prometheus histogram fed a batch of observations at once (prometheus-client observes one at a time)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry):
        self.name, self.documentation = name, documentation
        self._bounds = np.array(buckets, dtype=np.float64)
        self._bound_list = self._bounds.tolist()
        self._counts = np.zeros(len(buckets) + 1, dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: np.ndarray) -> None:
        """Add observations; a value lands in the first bucket whose bound is >= it."""
        if len(values) <= _FEW:  # numpy's cost per call outweighs its speed per value
            values = values.tolist()
            with self._lock:
                for v in values:
                    self._counts[bisect_left(self._bound_list, v)] += 1
                self._sum += sum(values)
            return
        idx = np.searchsorted(self._bounds, values, side="left")
        with self._lock:
            self._counts += np.bincount(idx, minlength=len(self._counts))
            self._sum += float(np.sum(values))

    def collect(self):
        """Export cumulative buckets, _count and _sum."""
        with self._lock:
            cumulative, total = np.cumsum(self._counts).tolist(), self._sum
        buckets = [(repr(float(b)), c) for b, c in zip(self._bounds.tolist(), cumulative)] + [("+Inf", cumulative[-1])]
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)


class Health:
    """Liveness (the loop turns) and readiness (started: model loaded and in the group), with what the worker depends on.

    Readiness only gates a rollout: no Service sends the worker traffic. An outage of what every replica shares (the
    broker, the registry, the input topic) is shown in /readyz but does not make a replica unready, which would stall
    a rollout exactly when a fixed version may be needed.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.heartbeat = time.monotonic()
        self.model_loaded = False
        self.in_group = False
        self.broker_reachable = False
        self.input_topic_present = True
        self.registry_reachable = True  # stays true without a Schema Registry

    def beat(self) -> None:
        """The loop went round once."""
        self.heartbeat = time.monotonic()

    def live(self) -> tuple[bool, dict]:
        """Whether the loop turned within the timeout."""
        age = time.monotonic() - self.heartbeat
        return age < self.timeout_s, {"heartbeat_age_s": round(age, 3), "timeout_s": self.timeout_s}

    def ready(self) -> tuple[bool, dict]:
        """Whether this replica started (model loaded, joined the group) and its loop turns; the shared dependencies."""
        started = {"model_loaded": self.model_loaded, "in_group": self.in_group}
        shared = {"broker_reachable": self.broker_reachable, "input_topic_present": self.input_topic_present,
                  "registry_reachable": self.registry_reachable}
        return all(started.values()) and self.live()[0], {**started, **shared, "degraded": not all(shared.values())}


def serve(metrics: Metrics, health: Health, host: str, port: int) -> ThreadingHTTPServer:
    """Start the metrics and health server in a daemon thread; return it (its port may be 0 → chosen)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            if self.path == "/metrics":
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif self.path in ("/healthz", "/readyz"):
                ok, state = health.live() if self.path == "/healthz" else health.ready()
                self._send(200 if ok else 503, json.dumps({"ok": ok, **state}).encode(), "application/json")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
