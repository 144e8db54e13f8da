"""How a training session ends on the terminal, the same for both front ends: the one line that tells
the user what to do next, and output that moves to a file when the terminal goes (the signals and
exit codes: moe_core/signals.py)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from moe_core.events import State
from moe_core.hints import watch_command


def print_next_step(trainer, resume_hint: str, sample_hint: str, stream=None) -> None:
    """After the session: how to resume an unfinished or failed run, or how to use a finished one."""
    stream = stream or sys.stderr
    try:
        if trainer.state == State.ERROR and trainer.last_saved_step < 0:
            print(
                f"no checkpoint was saved before the failure; start again from step 0 with: {resume_hint} --lr <lower>",
                file=stream,
            )
        elif trainer.state == State.ERROR:
            print(f"resume from the last good checkpoint with: {resume_hint} --lr <lower>", file=stream)
        elif trainer.unsaved:  # finished, but the final save failed (disk full?)
            last = trainer.last_saved_step
            print(
                f"steps after {last} were not saved (the last checkpoint is step {last}); once the disk is "
                f"writable, resume with: {resume_hint}",
                file=stream,
            )
        elif trainer.step_num < trainer.config.max_iters:
            print(f"resume with: {resume_hint}", file=stream)
        else:
            print(
                f"run {trainer.run_folder.name} finished at step {trainer.step_num}; "
                f"sample from it with: {sample_hint}",
                file=stream,
            )
    except OSError:  # no terminal left to print to after a hangup
        pass


def redirect_output(log: Path) -> None:
    """From now on, stdout and stderr append to `log` (a terminal that went away, a detached child)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # the terminal is gone already
            pass
    redirect_descriptors(log)
    _line_buffered()


def redirect_descriptors(log: Path) -> None:
    """Point file descriptors 1 and 2 at `log`, appending. System calls only, no Python stream or lock:
    safe in a signal handler, which may interrupt the main thread in the middle of a write to them (the
    lines still buffered then go to `log`)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)


def _line_buffered() -> None:
    for stream in (sys.stdout, sys.stderr):  # a line at a time, so `tail -f train.log` follows along
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)


def move_output_after_hangup(run) -> None:
    """The terminal is gone and training goes on: its lines go to the run's train.log, as if detached.
    Called from the SIGHUP handler: the descriptors move there and then; the streams are set to a line at
    a time and the notice printed by a thread of its own, since the handler may have interrupted the main
    thread while it held stdout's lock (a print there would raise "reentrant call")."""
    redirect_descriptors(run.path / "train.log")
    threading.Thread(target=_say_terminal_lost, args=(run,), name="hangup", daemon=True).start()


def _say_terminal_lost(run) -> None:
    _line_buffered()
    print(
        f"terminal lost (SIGHUP); training goes on; reattach with: {watch_command(run.name, run.path.parent)}",
        flush=True,
    )
