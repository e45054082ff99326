"""Fail-over on a real broker: a SIGKILLed replica's partitions move within the session timeout, for both group
protocols, and a static member restarted in time gets its partitions back with no rebalance of the others."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime

import pytest

from tests.kafkatools import WorkerProcess, committed_offsets, end_offsets, produce_transactions, wait_until
from worker.tools import traffic

pytestmark = pytest.mark.kafka
SESSION_S = 10.0  # the worker's classic session.timeout.ms, and the local broker's group.consumer.session.timeout.ms


def _events(w: WorkerProcess, name: str) -> list[dict]:
    return [e for e in (json.loads(line) for line in w.log().splitlines() if line.startswith("{")) if e["event"] == name]


def _at(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def _owned(w: WorkerProcess) -> set[int]:
    """The partitions a replica owns now, from its assignment and revocation lines."""
    owned: set[int] = set()
    lines = (json.loads(line) for line in w.log().splitlines() if line.startswith("{"))
    for e in lines:
        if e["event"] == "partitions_assigned":
            owned |= set(e["partitions"])
        elif e["event"] in ("partitions_revoked", "partitions_lost"):
            owned -= set(e["partitions"])
    return owned


def _all_committed(s) -> bool:
    return committed_offsets(s) == end_offsets(s, s.input_topic)


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_sigkilled_replica_partitions_move_within_the_session_timeout(protocol, settings_for, tmp_path, record_property):
    """After a SIGKILL of one of two replicas, the other owns every partition within the session timeout + 5 s and
    every transaction gets a verdict."""
    s = settings_for(partitions=4, group_protocol=protocol, consumer_config={})
    a = WorkerProcess(s.model_copy(update={"worker_id": "a"}), tmp_path / "a.log")
    b = WorkerProcess(s.model_copy(update={"worker_id": "b"}), tmp_path / "b.log")
    wait_until(lambda: _owned(a) and _owned(b) and len(_owned(a) | _owned(b)) == 4, 60, "both replicas assigned")
    produce_transactions(s, traffic.generated(2_000, seed=51, prefix="before"))
    wait_until(lambda: _all_committed(s), 60, "the first transactions committed")
    killed_at = time.time()
    assert a.kill() == -9
    sender = threading.Thread(target=produce_transactions,
                              args=(s, traffic.generated(3_000, seed=52, prefix="after"), 500))
    sender.start()
    wait_until(lambda: len(_owned(b)) == 4, SESSION_S + 30, "the survivor to own every partition")
    moved = _at(_events(b, "partitions_assigned")[-1]) - killed_at
    record_property(f"failover_s_{protocol}", round(moved, 2))
    print(f"\n{protocol}: partitions of the killed replica assigned to the survivor {moved:.1f} s after SIGKILL")
    sender.join()
    wait_until(lambda: _all_committed(s), 120, "every transaction committed")
    assert b.terminate() == 0, b.log()[-3000:]
    assert moved <= SESSION_S + 5


def test_static_member_restarted_in_time_resumes_without_a_rebalance(settings_for, tmp_path):
    """A static member SIGKILLed and restarted within the session timeout gets its own partitions back, and the
    other replica sees no revocation or assignment at all."""
    s = settings_for(partitions=4, consumer_config={})
    a_settings = s.model_copy(update={"worker_id": "a", "group_instance_id": "replica-a"})
    a = WorkerProcess(a_settings, tmp_path / "a1.log")
    b = WorkerProcess(s.model_copy(update={"worker_id": "b", "group_instance_id": "replica-b"}), tmp_path / "b.log")
    wait_until(lambda: _owned(a) and _owned(b) and len(_owned(a) | _owned(b)) == 4, 60, "both replicas assigned")
    produce_transactions(s, traffic.generated(1_000, seed=53, prefix="static"))
    wait_until(lambda: _all_committed(s), 60, "the first transactions committed")
    mine, theirs = _owned(a), _owned(b)
    b_lines = len(_events(b, "partitions_assigned")) + len(_events(b, "partitions_revoked"))
    assert a.kill() == -9
    again = WorkerProcess(a_settings, tmp_path / "a2.log")
    wait_until(lambda: _owned(again) == mine, SESSION_S, "the restarted member to get its partitions back")
    produce_transactions(s, traffic.generated(1_000, seed=54, prefix="static-after"))
    wait_until(lambda: _all_committed(s), 60, "every transaction committed")
    assert len(_events(b, "partitions_assigned")) + len(_events(b, "partitions_revoked")) == b_lines
    assert _owned(b) == theirs and not _events(b, "partitions_lost")
    assert again.terminate() == 0 and b.terminate() == 0


def test_consumer_protocol_static_member_back_too_early_exits_instead_of_hanging(settings_for, tmp_path):
    """With the consumer protocol the broker refuses a static member's id until its crashed predecessor's session
    expires (UNRELEASED_INSTANCE_ID, KIP-848): the early restart exits 1 with one line, a later one rejoins."""
    s = settings_for(partitions=2, group_protocol="consumer", consumer_config={},
                     worker_id="a", group_instance_id="replica-a")
    first = WorkerProcess(s, tmp_path / "a1.log")
    assert first.wait_assigned(), first.log()[-2000:]
    assert first.kill() == -9
    early = WorkerProcess(s, tmp_path / "a2.log")
    assert early.wait(60) == 1, early.log()[-3000:]
    failed = _events(early, "worker_failed")
    assert len(failed) == 1 and "consumer error" in failed[0]["reason"], early.log()[-3000:]
    time.sleep(SESSION_S)
    later = WorkerProcess(s, tmp_path / "a3.log")
    assert later.wait_assigned(), later.log()[-3000:]
    produce_transactions(s, traffic.generated(200, seed=55, prefix="static-consumer"))
    wait_until(lambda: _all_committed(s), 60, "every transaction committed")
    assert later.terminate() == 0
