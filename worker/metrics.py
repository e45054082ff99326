"""Prometheus metrics and the /metrics, /healthz and /readyz server."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class Metrics:
    """The worker's metrics, in a registry of their own so several workers can live in one process."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.consumed = Counter("fraud_worker_transactions_consumed", "Messages consumed from the input topic.", registry=r)
        self.verdicts = Counter("fraud_worker_verdicts", "Verdicts acknowledged by the broker.", ["decision"], registry=r)
        self.dead_letters = Counter("fraud_worker_dead_letters", "Dead letters acknowledged by the broker.", ["stage"], registry=r)
        self.batch_size = Histogram("fraud_worker_batch_size", "Messages per scored batch.", buckets=_BATCH_BUCKETS, registry=r)
        self.inference = Histogram("fraud_worker_batch_seconds", "Time to decode, score and encode one batch.", registry=r)
        self.end_to_end = Histogram(
            "fraud_worker_end_to_end_seconds", "Event time to verdict acknowledged.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.lag = Gauge("fraud_worker_consumer_lag", "Messages behind the end of each assigned partition.", ["topic", "partition"], registry=r)
        self.commits = Counter("fraud_worker_commits", "Offset commits sent.", registry=r)
        self.commit_failures = Counter("fraud_worker_commit_failures", "Offset commits that failed.", registry=r)
        self.fraud_rate = Gauge("fraud_worker_fraud_rate", "Share of verdicts with is_fraud since start.", registry=r)
        self.assigned = Gauge("fraud_worker_assigned_partitions", "Input partitions assigned to this worker.", registry=r)
        self.model = Info("fraud_worker_model", "The model in use.", registry=r)
        self._verdict_count = 0
        self._fraud_count = 0

    def verdict_acked(self, decision: str, is_fraud: bool, event_time_ms: int, now: float) -> None:
        """Count one acknowledged verdict."""
        self.verdicts.labels(decision).inc()
        self._verdict_count += 1
        self._fraud_count += is_fraud
        self.fraud_rate.set(self._fraud_count / self._verdict_count)
        self.end_to_end.observe(max(0.0, now - event_time_ms / 1000.0))


class Health:
    """Liveness (the loop turns) and readiness (model loaded, in the group, broker reachable)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.heartbeat = time.monotonic()
        self.model_loaded = False
        self.in_group = False
        self.broker_reachable = False

    def beat(self) -> None:
        """The loop went round once."""
        self.heartbeat = time.monotonic()

    def live(self) -> tuple[bool, dict]:
        """Whether the loop turned within the timeout."""
        age = time.monotonic() - self.heartbeat
        return age < self.timeout_s, {"heartbeat_age_s": round(age, 3), "timeout_s": self.timeout_s}

    def ready(self) -> tuple[bool, dict]:
        """Whether this worker can score now."""
        state = {"model_loaded": self.model_loaded, "in_group": self.in_group, "broker_reachable": self.broker_reachable}
        return all(state.values()) and self.live()[0], state


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
