"""What the local broker and the local registry share: a Java process of one checkout, known by its home's pid file.

A process's home (pid file, log, lock) belongs to one checkout (`<checkout>/var/<kind>-<port>`); a pid counts as the
home's process only while its command line names that home, so checkouts never adopt or stop each other's processes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import ClassVar

CACHE = Path(os.environ.get("FRAUD_CACHE_DIR", Path.home() / ".cache" / "fraud-worker")).resolve()
JAVA_HINT = "install a Java 17+ runtime (e.g. apt-get install openjdk-17-jre-headless)"
_PACKAGE_PARENT = Path(__file__).resolve().parents[2]


def checkout_dir() -> Path:
    """The checkout this package runs from (the current directory if it is installed elsewhere)."""
    return _PACKAGE_PARENT if (_PACKAGE_PARENT / "pyproject.toml").exists() else Path.cwd().resolve()


def local_home(port: int, name: str) -> Path:
    """This checkout's home for the process on `port`: `<checkout>/var/<name>-<port>`."""
    return checkout_dir() / "var" / f"{name}-{port}"


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct ports that are free on 127.0.0.1 right now (the OS picks them)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def require(tool: str, hint: str, error: type[Exception]) -> str:
    """The path of `tool` on PATH; `error` with `hint` if it is missing."""
    path = shutil.which(tool)
    if not path:
        raise error(f"{tool} not found on PATH: {hint}")
    return path


class LocalProcess:
    """A Java process on 127.0.0.1, adopted, reported or stopped only through the pid file in its `home`."""

    kind: ClassVar[str]  # names the default home, the pid file and the log
    title: ClassVar[str]  # the process in error messages
    error: ClassVar[type[RuntimeError]]
    address_name: ClassVar[str]  # the address's key in what the CLI prints
    port: int
    home: Path

    def __post_init__(self) -> None:
        self.home = Path(self.home).resolve() if self.home is not None else local_home(self.port, self.kind)
        self.launched = False  # whether this object started the process (rather than finding it running)

    @property
    def address(self) -> str:
        """Where clients reach the process."""
        raise NotImplementedError

    @property
    def log_file(self) -> Path:
        """Where the process's output goes."""
        return self.home / f"{self.kind}.log"

    @property
    def _pid_file(self) -> Path:
        return self.home / f"{self.kind}.pid"

    def answering(self, timeout: float = 1.0) -> bool:
        """Whether something answers at the address, whoever started it."""
        raise NotImplementedError

    def start(self, timeout: float = 90.0) -> str:
        """Start the process unless it already runs from this home; wait until it answers; return its address."""
        self.home.mkdir(parents=True, exist_ok=True)
        # Two test sessions may start the same process at once; the lock makes the second one find it running.
        with open(self.home / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._start(timeout)

    def _start(self, timeout: float) -> str:
        pid = self.pid()
        if pid is not None:
            if not self._runs_on_port(pid):
                raise self.error(f"the {self.kind} of {self.home} runs on another port; stop it first")
            if not self.answering():
                self._wait_ready(timeout)
            return self.address
        for port in self._ports():
            if port and not _port_free(port):
                raise self.error(f"port {port} on 127.0.0.1 is taken by another process; choose another with --port")
        command = self._command(require("java", JAVA_HINT, self.error))
        with open(self.log_file, "ab") as out:
            proc = subprocess.Popen(command, cwd=self.home, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self._pid_file.write_text(str(proc.pid))
        self.launched = True
        self._come_up(proc, timeout)
        return self.address

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop this home's process: SIGTERM, then SIGKILL after `timeout`; return its pid, None if none ran.

        Only the process in this home's pid file is signalled, and only if its command line names this home, so a
        process of another checkout (or one that reused a stale pid) is never touched.
        """
        pid = self.pid()
        if pid is None:
            self._pid_file.unlink(missing_ok=True)  # stale: the process is gone or is not this home's
            return None
        _signal(pid, signal.SIGTERM)
        _signal(pid, signal.SIGCONT)  # a paused (SIGSTOPped) process must run to act on the SIGTERM
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.1)
        self._pid_file.unlink(missing_ok=True)
        return pid

    def pid(self) -> int | None:
        """This home's process's pid if it runs; a live pid whose command line does not name this home is not it."""
        try:
            pid = int(self._pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) and runs_with(pid, self._home_arg()) else None

    def running(self) -> bool:
        """Whether this home's process is alive (a paused one counts)."""
        return self.pid() is not None

    def cli(self, action: str, failure: type[Exception]) -> int:
        """Do `fraud-worker <kind> start|stop|status` on this home: print the outcome as JSON, errors as `failure`."""
        try:
            if action == "start":
                out = {self.address_name: self.start(), "log": str(self.log_file)}
            elif action == "stop":
                pid = self.stop()
                out = {"stopped": pid is not None, "pid": pid, "port": self.port, "home": str(self.home)}
                if pid is None and self.answering(timeout=2):
                    out["note"] = f"a {self.kind} this checkout did not start answers on port {self.port}; left running"
            else:
                out = {"running": self.running(), "pid": self.pid(), self.address_name: self.address,
                       "home": str(self.home)}
        except self.error as exc:
            raise failure(str(exc)) from None
        print(json.dumps(out))
        return 0

    def _ports(self) -> tuple[int | None, ...]:
        """The ports the process binds, each checked free before it is launched (None: not used)."""
        return (self.port,)

    def _command(self, java: str) -> list[str]:
        """Prepare the launch (fetch, configure) and return the command line."""
        raise NotImplementedError

    def _home_arg(self) -> str:
        """The argument in the command line that names this home."""
        raise NotImplementedError

    def _runs_on_port(self, pid: int) -> bool:
        """Whether this home's running process `pid` listens on `port`."""
        raise NotImplementedError

    def _come_up(self, proc: subprocess.Popen, timeout: float) -> None:
        """Wait until the process just launched answers."""
        self._wait_ready(timeout, proc)

    def _wait_ready(self, timeout: float, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                hint = "; it needs Java 17+" if "UnsupportedClassVersionError" in tail(self.log_file) else ""
                raise self.error(f"{self.title} exited with code {proc.returncode} during start-up{hint}; "
                                 f"see {self.log_file}")
            if self.answering():
                return
            time.sleep(0.3)
        raise self.error(f"{self.title} did not answer on {self.address} within {timeout:.0f}s; see {self.log_file}")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state != "Z"
    except OSError:
        return True


def runs_with(pid: int, arg: str) -> bool:
    """Whether `arg` is one of process `pid`'s command-line arguments."""
    if Path("/proc/self/cmdline").exists():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return os.fsencode(arg) in args
    done = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True, text=True)
    return f" {arg} " in f" {done.stdout.strip()} "


def _signal(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def tail(path: Path, size: int = 20_000) -> str:
    """The text of a file's last `size` bytes ("" if there is no file)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
