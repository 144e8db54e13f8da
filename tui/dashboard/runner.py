"""A dashboard session from start to exit: `moe-tui train` on a terminal, or `moe-tui watch`.

What happens when, for training with the dashboard:
- q (asked first), Ctrl-C, SIGINT, SIGTERM: the trainer saves a checkpoint, the process exits with
  0 for q, else 128 + the signal;
- the terminal goes away (SIGHUP), with `--on-hangup keep` (the default): the screen closes and
  training goes on, its plain log lines appended to the run's train.log, as if started with
  --detach; `moe-tui watch NAME` reattaches; the process ends when training does;
- SIGHUP with `--on-hangup stop`: save and exit 129.
A viewer (`moe-tui watch`) never stops training, however it ends.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from moe_core.events import Notice, State
from moe_core.hints import resume_command, watch_command
from moe_core.signals import HANGUP, outcome_exit_code, signal_exit_code, signal_reason, stop_signals_handled
from tui.dashboard.app import Dashboard
from tui.exits import print_next_step, redirect_descriptors
from tui.headless import HeadlessReporter

HANGUP_GRACE_SECONDS = 3.0  # after the trainer has returned: time for the normal exit before a forced one
HANGUP_SAVE_TIMEOUT = 600.0  # a large model's checkpoint on a slow disk still gets this long


def run_dashboard(
    trainer,
    resume_hint: str,
    sample_hint: str,
    *,
    torch_threads: int | None = None,
    bus=None,
    on_hangup: str = "keep",
    finalise: Callable[[], None] = lambda: None,
) -> int:
    """Train under the dashboard until the user quits; returns the process exit code. `finalise`
    (release the run's lease) runs before any forced exit after a hangup."""
    history = trainer.run_folder.events() if trainer.resumed else []
    app = Dashboard(trainer, replay=history, resume_hint=resume_hint, torch_threads=torch_threads, bus=bus)
    with stop_on_signals(app, on_hangup, resume_hint, sample_hint, finalise):
        try:
            app.run()
        except Exception:
            if app.signal_received is None and not app.hung_up:
                raise
            # After a hangup the terminal is gone: restoring it fails, and nothing is lost by that.
        if app.hung_up:  # training goes on without a screen until it ends
            app.local.thread.join()
            return _code_after_hangup(app)
    code = app.exit_code if app.stopping else (app.return_code or 0)
    print_next_step(trainer, resume_hint, sample_hint)
    return code


def train_with_dashboard(running, torch_threads: int | None, on_hangup: str) -> int:
    """The dashboard as the training session's front end (moe_core/session/training.py)."""
    code = run_dashboard(
        running.trainer,
        running.resume_hint,
        running.sample_hint,
        torch_threads=torch_threads,
        bus=running.bus,
        on_hangup=on_hangup,
        finalise=running.finalise,
    )
    running.bus.subscribe(_notice_on_stderr)  # the screen is gone: the trackers' last words go to the terminal
    running.tracking.close()
    return code


def _notice_on_stderr(event) -> None:
    if isinstance(event, Notice):
        print(f"{event.level}: {event.message}", file=sys.stderr)


def viewer_app(followers, runs_dir) -> Dashboard:
    """The dashboard over runs trained elsewhere, whose `a` key adds runs from `runs_dir`."""
    from moe_core.live.follow import RunFollower
    from moe_core.store.runs import Run

    def add_run(name: str, check_only: bool = False):
        follower = RunFollower(Run.open(runs_dir, name), resume_command(name, runs_dir))
        if check_only:
            return None
        follower.attach()
        return follower

    return Dashboard(sources=followers, add_run=add_run)


def run_viewer(followers, runs_dir) -> int:
    """`moe-tui watch`: the viewer, until the user leaves. Returns 0 however it ends."""
    app = viewer_app(followers, runs_dir)

    def on_signal(signum, frame) -> None:
        app.signal_received = signum  # the drain leaves; a viewer has nothing to save
        if signum == HANGUP:
            _silence_terminal()
            threading.Thread(target=lambda: (time.sleep(HANGUP_GRACE_SECONDS), os._exit(0)), daemon=True).start()

    with stop_signals_handled(on_signal):
        try:
            app.run()
        except Exception:
            if app.signal_received is None:
                raise
    return 0


@contextmanager
def stop_on_signals(app: Dashboard, on_hangup: str, resume_hint: str, sample_hint: str, finalise: Callable[[], None]):
    """Route SIGHUP/SIGTERM/SIGINT as the table in this module's docstring says.

    The handler only sets flags, which the UI loop acts on at its next drain, except where the UI may
    be stuck writing to a dead terminal (Textual's output thread dies on EIO and its queue then
    blocks): after a hangup a watchdog thread ends the process itself once the trainer has returned.
    """

    def on_signal(signum, frame) -> None:
        if app.hung_up:  # no screen left to act on it: stop the trainer directly
            if signum == HANGUP:  # the shell passes the hangup on, then the kernel sends another
                return
            app.signal_received = app.signal_received or signum
            app.local.stop(signal_reason(signum))
            return
        if signum == HANGUP and on_hangup == "keep" and app.local is not None:
            app.hung_up = True
            _silence_terminal()
            threading.Thread(
                target=_train_on_headless, args=(app, resume_hint, sample_hint, finalise), name="hangup", daemon=True
            ).start()
            return
        first = app.signal_received is None
        app.signal_received = signum
        if first and signum == HANGUP:
            _silence_terminal()
            threading.Thread(target=_exit_after_hangup, args=(app, finalise), name="hangup", daemon=True).start()

    with stop_signals_handled(on_signal):
        yield


def _stop_when_done(local):
    """Without a screen nobody can sample a finished run here: end the process when training ends."""
    if local.trainer.state in (State.FINISHED, State.ERROR):
        local.stop("no screen")

    def subscriber(event) -> None:
        if getattr(event, "state", None) in (State.FINISHED, State.ERROR):
            local.stop("no screen")

    return subscriber


def _code_after_hangup(app: Dashboard) -> int:
    trainer = app.local.trainer
    outcome = (
        State.STOPPED
        if app.signal_received is not None
        else State.ERROR
        if trainer.state == State.ERROR
        else State.FINISHED
    )
    return outcome_exit_code(outcome, trainer.unsaved, app.signal_received)


def _train_on_headless(app: Dashboard, resume_hint: str, sample_hint: str, finalise) -> None:
    """After a hangup with --on-hangup keep: the run's lines go to its train.log, as a headless run's would,
    and the process ends once training has. On a thread of its own, not in the signal handler: the bus's
    lock, or the log's, may be held by the main thread the handler interrupted."""
    log = open(app.local.run.path / "train.log", "a", encoding="utf-8", buffering=1)
    run = app.local.run
    print(
        f"terminal lost (SIGHUP); training goes on; reattach with: {watch_command(run.name, run.path.parent)}", file=log
    )
    app.local.bus.unsubscribe(app.local.queue_event)  # nobody drains the screen's queue any more
    app.local.bus.subscribe(HeadlessReporter(log, progress=False))
    app.local.bus.subscribe(_stop_when_done(app.local))
    app.local.thread.join()
    print_next_step(app.local.trainer, resume_hint, sample_hint, stream=log)
    time.sleep(HANGUP_GRACE_SECONDS)  # the main thread's normal exit, unless the UI is stuck
    finalise()
    os._exit(_code_after_hangup(app))


def _silence_terminal() -> None:
    # Descriptors only (safe in a signal handler); not stdin: Textual's input thread would spin on
    # /dev/null's endless EOF.
    redirect_descriptors(Path(os.devnull))


def _exit_after_hangup(app: Dashboard, finalise) -> None:
    app.local.stop("hangup received")
    deadline = time.monotonic() + HANGUP_SAVE_TIMEOUT
    while app.local.live and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(HANGUP_GRACE_SECONDS)
    finalise()
    os._exit(signal_exit_code(signal.SIGHUP))
