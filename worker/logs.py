"""structlog set-up: JSON lines on stdout (console format on a TTY), each bound to the worker and group."""

from __future__ import annotations

import logging
import sys
import time

import structlog


class _CurrentStdout:
    """sys.stdout as it is at each write, so loggers made earlier follow a stdout replaced since (as pytest does)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


STDOUT = _CurrentStdout()


def configure(level: str = "INFO", json: bool | None = None) -> None:
    """Configure structlog once per process."""
    if json is None:
        json = not sys.stdout.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(STDOUT),
        cache_logger_on_first_use=True,
    )


def bind(**context) -> None:
    """Attach context (worker_id, group) to every following line of this process."""
    structlog.contextvars.bind_contextvars(**context)


def get_logger(name: str = "worker"):
    """A structlog logger."""
    return structlog.get_logger(name)


class FirstSeen:
    """Says whether a message is new, or last seen more than `quiet_s` seconds ago (for repeated client errors)."""

    def __init__(self, quiet_s: float, clock=time.monotonic):
        self.quiet_s, self.clock = quiet_s, clock
        self._last: dict[str, float] = {}

    def first(self, message: str) -> bool:
        """True the first time `message` (less librdkafka's "(after N ms …)" tail) is seen in a quiet window."""
        key = message.split(" (after ", 1)[0]
        now = self.clock()
        if now - self._last.get(key, -self.quiet_s - 1) <= self.quiet_s:
            return False
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = now
        return True
