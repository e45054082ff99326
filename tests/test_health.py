"""Readiness and liveness of a worker that serves no traffic (worker/metrics.py Health)."""

from __future__ import annotations

from worker.metrics import Health


def _started() -> Health:
    h = Health(timeout_s=60)
    h.model_loaded = h.in_group = h.broker_reachable = True
    return h


def test_not_ready_until_the_model_is_loaded_and_the_group_joined():
    h = Health(timeout_s=60)
    h.broker_reachable = True
    assert h.ready()[0] is False
    h.model_loaded = True
    assert h.ready()[0] is False
    h.in_group = True
    assert h.ready() == (True, {"model_loaded": True, "in_group": True, "broker_reachable": True,
                                "input_topic_present": True, "registry_reachable": True, "degraded": False})


def test_a_shared_outage_is_shown_but_keeps_the_replica_ready():
    """Broker, registry or input topic away: every replica shares it, so none turns unready (a rollout can proceed)."""
    for outage in ("broker_reachable", "registry_reachable", "input_topic_present"):
        h = _started()
        setattr(h, outage, False)
        ready, state = h.ready()
        assert ready is True and state["degraded"] is True and state[outage] is False


def test_a_stuck_loop_is_neither_live_nor_ready():
    h = _started()
    h.heartbeat -= 61
    assert h.live()[0] is False and h.ready()[0] is False
