"""A worker replica in a child process (`python -m worker run`), for the demo, the chaos harness and tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..settings import ROOT, Settings


class Replica:
    """One `fraud-worker run` process with its own log file."""

    def __init__(self, settings: Settings, log_path: Path, **extra_env: str):
        self.settings = settings
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
        env.update(settings.to_env())
        env["PYTHONUNBUFFERED"] = "1"  # every log line reaches the file, even if the process is killed
        env.update(extra_env)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "worker", "run"], cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log(self) -> str:
        """The process's output so far."""
        return self.log_path.read_text(errors="replace")

    def owned(self) -> set[int]:
        """The input partitions it owns now, from its partitions_assigned / _revoked / _lost log lines."""
        owned: set[int] = set()
        for line in self.log().splitlines():
            if '"partitions_' not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:  # the last line of a killed process may be cut short
                continue
            if event.get("event") == "partitions_assigned":
                owned |= set(event["partitions"])
            elif event.get("event") in ("partitions_revoked", "partitions_lost"):
                owned -= set(event["partitions"])
        return owned

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def wait_assigned(self, timeout: float = 60.0) -> bool:
        """Wait until the worker has joined the group and got partitions; False if it exited or timed out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            if "partitions_assigned" in self.log():
                return True
            time.sleep(0.1)
        return False

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait for the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> int:
        """SIGKILL and reap."""
        if self.alive():
            self.proc.kill()
        return self.wait(10)

    def wait(self, timeout: float) -> int:
        """Wait for exit; return the code (SIGKILL after the timeout)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
        finally:
            self._log.close()
