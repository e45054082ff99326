"""Log hygiene helpers: repeated client errors are said once per quiet window."""

from __future__ import annotations

from worker.logs import FirstSeen


def test_first_seen_says_a_repeated_error_once_per_window():
    """The same error, even with a different "(after N ms …)" tail, is new only after the quiet window."""
    now = [100.0]
    seen = FirstSeen(30.0, clock=lambda: now[0])
    refused = "127.0.0.1:9092/1: Connect to ipv4#127.0.0.1:9092 failed: Connection refused (after {}ms in state CONNECT)"
    assert seen.first(refused.format(0))
    now[0] += 10
    assert not seen.first(refused.format(3))
    assert seen.first("GroupCoordinator: another error")
    now[0] += 25
    assert seen.first(refused.format(7))
