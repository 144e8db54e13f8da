"""One live trainer per run, and what became of the last one.

The trainer holds an exclusive flock on `control/lock` for as long as it lives. The kernel drops it
when the process ends however it ends (kill -9, the OOM killer), so "is the lock free?" is an exact
liveness test with no PID reuse to fool it. `process.json` records who holds the run and, on a clean
exit, how it ended; one that still says "live" while the lock is free is a process that died.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from moe_core.atomic import atomic_write_text
from moe_core.errors import UserError
from moe_core.hints import stop_command, watch_command
from moe_core.store.runs import Run

CONTROL_DIR, LOCK_FILE, SOCKET_FILE, PROCESS_FILE = "control", "lock", "socket", "process.json"
ACQUIRE_SECONDS = 2.0  # a viewer's probe holds the lock for microseconds: retry that long before giving up


def control_dir(run: Run) -> Path:
    return run.path / CONTROL_DIR


def socket_path(run: Run) -> Path:
    return control_dir(run) / SOCKET_FILE


def make_control_dir(run: Run) -> Path:
    """The private folder for the lock and the socket: mode 0700, owned by this user."""
    folder = control_dir(run)
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask, and an old folder keeps its own
    return folder


@dataclass(frozen=True)
class RunStatus:
    state: str  # "live", "starting", "finished", "stopped", "error", "crashed", or "unknown" (from before leases)
    pid: int | None = None
    host: str | None = None
    step: int | None = None  # the step it ended at, for a process that ended cleanly

    def describe(self) -> str:
        if self.state == "live":
            return f"live (PID {self.pid})"
        if self.state == "starting":
            return "starting"
        return self.state if self.state != "unknown" else "-"


class RunLease:
    """This process's claim on a run: `acquire()` before touching the run's files (it writes nothing
    where the lock file exists), `activate()` once training is about to start, `release()` at the end."""

    def __init__(self, run: Run, fd: int):
        self.run, self._fd = run, fd
        self.record: dict | None = None

    @classmethod
    def acquire(cls, run: Run) -> "RunLease":
        """Claim the run, or a UserError naming the process that has it."""
        make_control_dir(run)
        fd = os.open(control_dir(run) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + ACQUIRE_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return cls(run, fd)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise UserError(already_live_message(run, read_status(run).pid)) from None
                time.sleep(0.05)

    def activate(self) -> None:
        """Record this process as the run's trainer."""
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "state": "live"}
        atomic_write_text(self.run.path / PROCESS_FILE, json.dumps(self.record))

    def release(self, state: str | None = None, step: int = 0) -> None:
        """Free the run; once active, first record how the process ended ("finished", "stopped", "error")."""
        try:
            if self.record is not None and state is not None:
                atomic_write_text(
                    self.run.path / PROCESS_FILE,
                    json.dumps({**self.record, "state": state, "step": step, "ended": time.time()}),
                )
        except OSError:
            pass  # disk full: the run reads as crashed, which is the safe side
        finally:
            if self._fd >= 0:
                os.close(self._fd)  # drops the lock
                self._fd = -1


def already_live_message(run: Run, pid: int | None) -> str:
    who = f"process {pid}" if pid else "another process"
    return (
        f"run '{run.name}' is being trained by {who} right now; watch it with `{watch_command(run.name, run.path.parent)}` "
        f"or stop it with `{stop_command(run.name, run.path.parent)}`"
    )


def is_live(run: Run) -> bool:
    """True while some process holds the run's lock."""
    try:
        fd = os.open(control_dir(run) / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except PermissionError:
        raise UserError(
            f"{control_dir(run)} belongs to another user; only its owner can watch or control this run"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops a shared lock taken just now


def read_status(run: Run) -> RunStatus:
    """What process.json says, checked against the lock: live, or how the last process ended."""
    try:
        record = json.loads((run.path / PROCESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    pid, host = record.get("pid"), record.get("host")
    if is_live(run):  # locked; until its trainer records itself, process.json still names the previous one
        return RunStatus("live", pid, host) if record.get("state") == "live" else RunStatus("starting")
    state = record.get("state")
    if state == "live":
        return RunStatus("crashed", pid, host)
    if state in ("finished", "stopped", "error"):
        return RunStatus(state, pid, host, record.get("step"))
    return RunStatus("unknown")


def process_gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie waiting for its parent to reap it counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
