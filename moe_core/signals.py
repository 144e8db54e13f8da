"""The signals that stop a training process cleanly, and what they mean for its exit code.

Lost connection (SIGHUP), `kill` (SIGTERM), Ctrl-C (SIGINT): each saves a checkpoint and exits,
never mid-step, with the shell's code for the signal.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Callable, Iterator

from moe_core.events import State

HANGUP = getattr(signal, "SIGHUP", None)
STOP_SIGNALS = tuple(s for s in (HANGUP, signal.SIGTERM, signal.SIGINT) if s is not None)


def signal_exit_code(signum: int) -> int:
    """The shell's convention: 128 + the signal number (SIGHUP 129, SIGINT 130, SIGTERM 143)."""
    return 128 + int(signum)


def signal_reason(signum: int) -> str:
    """Why a run stopped, as its log and viewers say it: SIGINT -> "int received"."""
    return f"{signal.Signals(signum).name.removeprefix('SIG').lower()} received"


GUARD_STOPPED = 3  # the exit code of a run the guard stopped (--on-alert stop): a script must notice


def outcome_exit_code(outcome: State, unsaved: bool, signum: int | None = None, guard_stopped: bool = False) -> int:
    """The exit code of a training process: a stop by a signal is 128 + its number, by the guard 3, on
    request (a viewer, `moe-tui stop`, q) 0; a failure 1, and so is a finished run whose last save failed."""
    if outcome == State.STOPPED and guard_stopped:
        return GUARD_STOPPED
    if outcome == State.STOPPED:
        return signal_exit_code(signum) if signum is not None else 0
    return 1 if outcome == State.ERROR or unsaved else 0


@contextmanager
def stop_signals_handled(handler: Callable) -> Iterator[None]:
    """Route STOP_SIGNALS to `handler` for the duration, then restore the previous handlers."""
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
