"""The live training dashboard: `moe-tui train` on a terminal.

    code = run_dashboard(trainer, resume_hint="moe-tui train --resume NAME")

The trainer runs in a Textual thread worker and reports through `trainer.on_event`, which only puts
events on a thread-safe queue. The UI drains that queue four times a second into `DashboardState` and
redraws the panels whose part of the state changed, so a fast trainer never floods a slow SSH link.
Every user command goes to `trainer.control`; the trainer acts on it between two steps.

`Dashboard(replay=events)` draws a recorded event stream without a trainer (layout tests, demos).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from queue import Empty, SimpleQueue
from typing import Iterable

import torch
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Grid
from textual.screen import ModalScreen
from textual.widgets import Footer, Static
from textual.worker import Worker, WorkerState

from moe_core.events import Event, from_record
from moe_core.sampling import SampleRequest

from .exits import print_next_step, signal_exit_code, stop_signals_handled
from .screens import ConfirmQuit, HelpScreen, SampleDialog
from .widgets import DashboardState, EventsLog, ExpertPanel, LossChart, SamplesPanel, StatusBar
from .widgets.state import CHART, EXPERTS, LOG, SAMPLES, STATUS

DRAIN_SECONDS = 0.25  # UI refresh period: a few updates a second, whatever the training speed
ANSWER_POLL_SECONDS = 0.05  # while a command waits for the trainer's answer
CHART_SECONDS = 1.0  # the loss chart and expert bars redraw at most this often (the status line: every drain)

# Actions that send a command to the trainer, and the states in which the trainer can take them.
TRAINER_ACTIONS = {
    "pause": ("starting", "running", "evaluating", "saving", "sampling"),
    "resume": ("paused",),
    "sample": ("starting", "running", "paused", "evaluating", "saving", "sampling", "finished"),
    "save": ("running", "paused", "finished"),  # never in "error": that would save the broken weights
    "evaluate": ("running", "paused", "finished"),
}

DASHBOARD_ACTIONS = {*TRAINER_ACTIONS, "toggle_log_y", "toggle_window", "help", "quit"}


class Dashboard(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "moe-tui"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("space", "pause", "Pause"),
        Binding("space", "resume", "Resume"),  # the Footer shows whichever of the two applies
        Binding("s", "sample", "Sample"),
        Binding("c", "save", "Save"),
        Binding("e", "evaluate", "Eval"),
        Binding("l", "toggle_log_y", "Log-y"),
        Binding("w", "toggle_window", "Window"),
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("ctrl+c", "interrupt", "Interrupt", show=False, priority=True),
    ]

    def __init__(self, trainer=None, replay: Iterable[Event] = (), resume_hint: str = "",
                 torch_threads: int | None = None) -> None:
        super().__init__()
        self.trainer = trainer
        self.torch_threads = torch_threads  # for the trainer's thread: see reserve_torch_threads()
        self.resume_hint = resume_hint
        self.model = DashboardState()
        self.events: SimpleQueue[Event] = SimpleQueue()
        for event in replay:
            self.events.put(event)
        self.worker: Worker | None = None
        self._answer_watch = None  # a Timer, while a command waits for its answer
        self._charts_drawn_at = -CHART_SECONDS
        self._bindings_state = ""
        self.exit_code = 0
        self.stopping = False
        self.signal_received: int | None = None  # set by the signal handler, acted on by `drain`
        self.last_request = SampleRequest(prompt="\n", max_new_tokens=200, temperature=0.8)

    # -- layout and the event pump -------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield StatusBar(self.model, id="status")
        yield Static(id="error-banner")
        with Grid(id="panels"):
            yield LossChart(self.model, id="loss-chart")
            yield ExpertPanel(self.model, id="experts")
            yield SamplesPanel(self.model, "samples · newest first", id="samples")
            yield EventsLog(self.model, "events", id="events")
        yield Footer()

    def on_mount(self) -> None:
        self.drain()  # a replayed stream is on the very first frame
        self.set_interval(DRAIN_SECONDS, self.drain)
        if self.trainer is not None:
            self.trainer.on_event = self.events.put  # called on the worker thread: a queue put only
            self.worker = self.run_worker(self._train, name="trainer", thread=True, exit_on_error=False)

    def _train(self) -> str:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        return self.trainer.run(serve_after_finish=True)

    def drain(self) -> None:
        """Fold queued events into the state, redraw what changed, act on a received signal."""
        if not self.is_running:  # shutting down: a timer tick can land after the panels are gone
            return
        while True:
            try:
                self.model.apply(self.events.get_nowait())
            except Empty:
                break
        if self.trainer is not None:
            self.model.observe_step(self.trainer.step_num)  # an int read: safe across threads
        if self.signal_received is not None and not self.stopping:
            name = signal.Signals(self.signal_received).name.replace("SIG", "").lower()
            self.stop_and_exit(signal_exit_code(self.signal_received), f"{name} received")
        self.refresh_panels()

    def refresh_panels(self) -> None:
        changed, self.model.changed = self.model.changed, set()
        if self.model.state != self._bindings_state:  # keys that apply change with the state
            self._bindings_state = self.model.state
            self.refresh_bindings()
        if STATUS in changed:
            self.query_one(StatusBar).refresh_from_state()
            banner = self.query_one("#error-banner", Static)
            if self.model.error is not None and str(banner.content) != f"✗ {self.model.error}":
                banner.update(f"✗ {self.model.error}")
                banner.display = True
        charts = changed & {CHART, EXPERTS}
        if charts and time.monotonic() - self._charts_drawn_at < CHART_SECONDS:
            self.model.changed |= charts  # drawn at a later drain: charts are the costly part
        elif charts:
            self._charts_drawn_at = time.monotonic()
            if CHART in charts:
                self.query_one(LossChart).refresh_from_state()
            if EXPERTS in charts:
                self.query_one(ExpertPanel).refresh_from_state()
        if SAMPLES in changed:
            self.query_one(SamplesPanel).refresh_from_state()
        if LOG in changed:
            self.query_one(EventsLog).refresh_from_state()

    # -- commands ------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action in DASHBOARD_ACTIONS and isinstance(self.screen, ModalScreen):
            return False  # while a dialog is open, its keys belong to the dialog
        if action in TRAINER_ACTIONS:
            if action in ("pause", "resume"):  # one space key, two meanings: show the one that applies
                paused = self.model.state == "paused"
                if (action == "resume") != paused:
                    return False
            # None: shown greyed out in the Footer, the key does nothing.
            if self.trainer is None or self.stopping or self.model.state not in TRAINER_ACTIONS[action]:
                return None
            return True
        return True

    def _send(self, pending: str, command) -> None:
        command()
        self.model.request(pending)
        self.refresh_panels()  # the key's effect shows now, not at the next drain
        if self._answer_watch is None:  # and the trainer's answer shows within 50 ms of arriving
            self._answer_watch = self.set_interval(ANSWER_POLL_SECONDS, self._drain_until_answered)

    def _drain_until_answered(self) -> None:
        self.drain()
        if self.model.pending is None and self._answer_watch is not None:
            self._answer_watch.stop()
            self._answer_watch = None

    def action_pause(self) -> None:
        self._send("pausing", self.trainer.control.pause)

    def action_resume(self) -> None:
        self._send("resuming", self.trainer.control.resume)

    def action_save(self) -> None:
        self._send("saving", self.trainer.control.save)

    def action_evaluate(self) -> None:
        self._send("evaluating", self.trainer.control.evaluate)

    def action_sample(self) -> None:
        def sample(request: SampleRequest | None) -> None:
            if request is not None and not self.stopping:
                self.last_request = request
                self._send("sampling", lambda: self.trainer.control.sample(request))

        self.push_screen(SampleDialog(self.last_request, self._check_request), sample)

    def _check_request(self, request: SampleRequest) -> None:
        request.check()
        self.trainer.vocab.encode(request.prompt)  # unknown characters: UserError, shown in the dialog

    def action_toggle_log_y(self) -> None:
        chart = self.query_one(LossChart)
        chart.log_y = not chart.log_y

    def action_toggle_window(self) -> None:
        chart = self.query_one(LossChart)
        chart.recent = not chart.recent

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        if self.stopping:
            return
        if self.trainer is None or not self._worker_running():
            self.exit(self.exit_code, return_code=self.exit_code)
            return
        if self.model.state == "finished":
            message = "Quit? Training has finished; the final checkpoint is saved."
        elif self.model.state == "error":
            message = (f"Quit? Training stopped on an error and the last good checkpoint is kept;\n"
                       f"continue from it with a lower learning rate:\n{self.resume_hint} --lr <lower>")
        else:
            message = f"Stop training and quit?\nA checkpoint is saved first; continue later with\n{self.resume_hint}"
        self.push_screen(ConfirmQuit(message), lambda yes: yes and self.stop_and_exit(0, "quit"))

    def action_interrupt(self) -> None:
        """Ctrl-C: no question asked (the terminal sends it as a key, not as SIGINT)."""
        if not self.stopping:
            self.stop_and_exit(signal_exit_code(signal.SIGINT), "interrupted")

    def stop_and_exit(self, code: int, reason: str) -> None:
        """Ask the trainer to save and stop; the app exits when the worker has returned."""
        self.stopping = True
        self.exit_code = 1 if self.model.state == "error" and code == 0 else code
        if isinstance(self.screen, ModalScreen):
            self.pop_screen()
        if self.trainer is None or not self._worker_running():
            self.exit(self.exit_code, return_code=self.exit_code)
            return
        self._send("saving and quitting", lambda: self.trainer.control.stop(reason))

    def _worker_running(self) -> bool:
        return self.worker is not None and self.worker.state in (WorkerState.PENDING, WorkerState.RUNNING)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker is not self.worker or event.state in (WorkerState.PENDING, WorkerState.RUNNING):
            return
        self.drain()
        if self.stopping:
            self.exit(self.exit_code, return_code=self.exit_code)
        elif event.state == WorkerState.ERROR:  # a bug, not a training failure (those are events)
            self.model.error = f"the training thread crashed: {event.worker.error!r}"
            self.model.state = "error"
            self.model.changed.add(STATUS)
            self.refresh_panels()

    def on_unmount(self) -> None:
        # However the app ends, the trainer must return, or the interpreter would wait for its thread.
        if self._worker_running():
            self.trainer.control.stop("dashboard closed")


def run_history(run) -> list[Event]:
    """A resumed run's logged events (already cut back to its checkpoint), so that the charts show
    the whole run and not only this session. Lines of unknown kinds are skipped."""
    events = []
    for record in run.read_metrics():
        try:
            events.append(from_record(record))
        except (KeyError, TypeError):
            continue
    return events


def reserve_torch_threads() -> int:
    """Leave the calling (UI) thread one torch thread; returns how many the trainer's thread should take.

    libgomp, the OpenMP runtime under torch's CPU kernels, keeps idle threads spinning between parallel
    regions only while it manages no more threads than there are CPUs; past that they sleep at once,
    and every small operator pays to wake them. Each thread that runs torch work gets its own team, so a
    UI thread that had used N threads, plus the trainer's N, slowed training by 15-20% on 2 cores. A
    team of one adds no threads. Call it before this thread runs any torch work (building the trainer
    included).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def run_dashboard(trainer, resume_hint: str, sample_hint: str = "", torch_threads: int | None = None) -> int:
    """Run the dashboard until the user quits; returns the process exit code."""
    history = run_history(trainer.run_dir) if trainer.resumed else []
    app = Dashboard(trainer, replay=history, resume_hint=resume_hint, torch_threads=torch_threads)
    with stop_on_signals(app, trainer):
        try:
            app.run()
        except Exception:
            if app.signal_received is None:
                raise
            # After a hangup the terminal is gone: restoring it fails, and nothing is lost by that.
    code = app.exit_code if app.stopping else (app.return_code or 0)
    print_next_step(trainer, resume_hint, sample_hint or f"moe-tui sample {trainer.run_dir.name}")
    return code


HANGUP_GRACE_SECONDS = 3.0  # after the trainer has saved: time for the normal exit before a forced one
HANGUP_SAVE_TIMEOUT = 600.0  # a large model's checkpoint on a slow disk still gets this long


@contextmanager
def stop_on_signals(app: Dashboard, trainer):
    """SIGHUP/SIGTERM/SIGINT: save a checkpoint, stop the trainer and exit with 128 + the signal.

    The handler only sets a flag, which the UI loop acts on at its next drain. A hangup needs more:
    the terminal is gone, so writes go to /dev/null from now on, and a watchdog thread stops the
    trainer itself and ends the process once the checkpoint is saved, in case the UI loop is stuck
    writing to the dead terminal (Textual's output thread dies on EIO and its queue then blocks).
    """

    def on_signal(signum, frame) -> None:
        first = app.signal_received is None
        app.signal_received = signum
        if first and signum == getattr(signal, "SIGHUP", None):
            _detach_from_terminal()
            threading.Thread(target=_exit_after_hangup, args=(app, trainer), name="hangup", daemon=True).start()

    with stop_signals_handled(on_signal):
        yield


def _detach_from_terminal() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):  # not stdin: Textual's input thread would spin on /dev/null's endless EOF
        os.dup2(devnull, fd)


def _exit_after_hangup(app: Dashboard, trainer) -> None:
    trainer.control.stop("hangup received")
    deadline = time.monotonic() + HANGUP_SAVE_TIMEOUT
    while app._worker_running() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(HANGUP_GRACE_SECONDS)
    os._exit(signal_exit_code(signal.SIGHUP))
