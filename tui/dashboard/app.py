"""The training dashboard: one screen for a run training here, or for any runs watched from elsewhere.

    Dashboard(trainer)                   # `moe-tui train` on a terminal: this process's trainer
    Dashboard(sources=[RunFollower(...)])   # `moe-tui watch RUN ...`: a viewer of runs anywhere

Each source (see `sources.py`) hands over its new events four times a second; they are folded into
that run's `RunView`, and the panels whose part of the state changed are redrawn, so a fast
trainer never floods a slow SSH link. Commands go back through the source in focus: to this
process's trainer directly, or over a live trainer's control channel. Several runs overlay their
validation curves in the loss chart; the other panels show the run in focus.

`Dashboard(replay=events)` draws a recorded event stream without a trainer (layout tests, demos).
"""

from __future__ import annotations

import signal
import time
from typing import Iterable

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Grid
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

from moe_core.errors import UserError
from moe_core.events import Event, State
from moe_core.model.sampling import SampleRequest
from moe_core.signals import signal_exit_code, signal_reason
from tui.dashboard.experts_screen import ExpertsScreen
from tui.dashboard.run_view import CHART, EXPERTS, LOG, SAMPLES, STATUS, RunView
from tui.dashboard.screens import AddRunDialog, ConfirmQuit, HelpScreen, SampleDialog
from tui.dashboard.sources import LocalTrainer
from tui.dashboard.widgets.experts import ExpertPanel
from tui.dashboard.widgets.loss_chart import LossChart
from tui.dashboard.widgets.panels import EventsLog, SamplesPanel
from tui.dashboard.widgets.status import StatusBar

DRAIN_SECONDS = 0.25  # UI refresh period: a few updates a second, whatever the training speed
ANSWER_POLL_SECONDS = 0.05  # while a command waits for the trainer's answer
CHART_SECONDS = 1.0  # the loss chart and expert bars redraw at most this often (the status line: every drain)

# Actions that send a command to the trainer, and the states in which the trainer can take them.
RUNNING, PAUSED, FINISHED, ERROR = State.RUNNING, State.PAUSED, State.FINISHED, State.ERROR
BUSY = (State.STARTING, RUNNING, State.EVALUATING, State.SAVING, State.SAMPLING)  # training, or about to
TRAINER_ACTIONS = {
    "pause": BUSY,
    "resume": (PAUSED,),
    "sample": (*BUSY, PAUSED, FINISHED),
    "save": (RUNNING, PAUSED, FINISHED),  # never in ERROR: that would save the broken weights
    "evaluate": (RUNNING, PAUSED, FINISHED),
    "stop_run": (*BUSY, PAUSED, FINISHED, ERROR),
}

DASHBOARD_ACTIONS = {
    *TRAINER_ACTIONS,
    "experts",
    "toggle_log_y",
    "toggle_window",
    "toggle_x",
    "next_run",
    "add_run",
    "help",
    "quit",
}


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
        Binding("r", "experts", "Experts"),
        Binding("l", "toggle_log_y", "Log-y"),
        Binding("w", "toggle_window", "Window"),
        Binding("x", "toggle_x", "Step/time"),
        Binding("n", "next_run", "Next run"),
        Binding("a", "add_run", "Add run"),
        Binding("S", "stop_run", "Stop run"),
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("ctrl+c", "interrupt", "Interrupt", show=False, priority=True),
    ]

    def __init__(
        self,
        trainer=None,
        replay: Iterable[Event] = (),
        resume_hint: str = "",
        torch_threads: int | None = None,
        sources: list | None = None,
        bus=None,
        add_run=None,
    ) -> None:
        super().__init__()
        self.local = LocalTrainer(trainer, bus, torch_threads, resume_hint) if trainer is not None else None
        self.sources = [self.local] if self.local else list(sources or [])
        self.views = [RunView() for _ in self.sources] or [RunView()]
        self._generations = [source.generation for source in self.sources]
        self.focus_index = 0
        self.resume_hint = resume_hint
        self.add_run_source = add_run  # name -> a new source, for the `a` key of a viewer
        for event in replay:
            self.views[0].apply(event)
        self._answer_watch = None  # a Timer, while a command waits for its answer
        self._charts_drawn_at = -CHART_SECONDS
        self._bindings_state = ""
        self.exit_code = 0
        self.stopping = False
        self.signal_received: int | None = None  # set by the signal handler, acted on by `drain`
        self.hung_up = False  # the terminal is gone: leave the screen, keep training (see session.py)
        self.last_request = SampleRequest(prompt="\n", max_new_tokens=200, temperature=0.8)

    @property
    def view(self) -> RunView:
        """The state of the run in focus."""
        return self.views[self.focus_index]

    @property
    def source(self):
        return self.sources[self.focus_index] if self.sources else None

    @property
    def trainer(self):
        return self.local.trainer if self.local else None

    # -- layout and the event pump -------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield StatusBar(self.view, id="status")
        yield Static(id="error-banner")
        with Grid(id="panels"):
            yield LossChart(self.view, id="loss-chart")
            yield ExpertPanel(self.view, id="experts")
            yield SamplesPanel(self.view, "samples · newest first", id="samples")
            yield EventsLog(self.view, "events", id="events")
        yield Footer()

    def on_mount(self) -> None:
        self._show_focus()
        self.drain()  # a replayed stream, a watched run's history: on the very first frame
        self.set_interval(DRAIN_SECONDS, self.drain)
        if self.local is not None:
            self.local.start()

    def drain(self) -> None:
        """Fold new events into each run's state, redraw what changed, act on a received signal."""
        if not self.is_running:  # shutting down: a tick can land after the panels are gone
            return
        if self.hung_up:  # the terminal is gone: leave the screen; training goes on (see session.py)
            self.exit(0, return_code=0)
            return
        for i, source in enumerate(self.sources):
            events = source.poll()
            if source.generation != self._generations[i]:  # its history was rewritten: start afresh
                self._generations[i] = source.generation
                self.views[i] = RunView()
                if i == self.focus_index:
                    self._show_focus()
            for event in events:
                self.views[i].apply(event)
            self.views[i].observe_step(source.step)
        if len(self.views) > 1 and any(m.changed & {CHART} for m in self.views):
            self.view.changed.add(CHART)  # another run's curve moved
        if self.local is not None and not self.local.live and self.local.outcome is not None:
            self._trainer_returned()
        if self.signal_received is not None and not self.stopping:
            self.stop_and_exit(signal_exit_code(self.signal_received), signal_reason(self.signal_received))
        self.refresh_panels()

    def _trainer_returned(self) -> None:
        if self.stopping:
            self.exit(self.exit_code, return_code=self.exit_code)
        elif self.local.crash is not None and self.view.error is None:  # a bug, not a training failure
            self.view.error = f"the training thread crashed: {self.local.crash!r}"
            self.view.state = State.ERROR
            self.view.changed.add(STATUS)
        elif self.local.crash is None:  # stopped from outside (`moe-tui stop`, a viewer): nothing left to show
            self.exit(0, return_code=0)

    def refresh_panels(self) -> None:
        changed = set(self.view.changed)
        for view in self.views:  # the others' changes reach the screen through the chart's overlay only
            view.changed.clear()
        if self.view.state != self._bindings_state:  # keys that apply change with the state
            self._bindings_state = self.view.state
            self.refresh_bindings()
        if STATUS in changed:
            self.query_one(StatusBar).refresh_from_state()
            banner = self.query_one("#error-banner", Static)
            message = self.view.banner
            if str(banner.content) != message:
                banner.update(message)
                banner.display = bool(message)
        charts = changed & {CHART, EXPERTS}
        if charts and time.monotonic() - self._charts_drawn_at < CHART_SECONDS:
            self.view.changed |= charts  # drawn at a later drain: charts are the costly part
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

    def _show_focus(self) -> None:
        """Point every panel at the run in focus (and the chart at all of them)."""
        for widget in (StatusBar, ExpertPanel, SamplesPanel, EventsLog):
            self.query_one(widget).view = self.view
        chart = self.query_one(LossChart)
        chart.view = self.view
        chart.overlay = (
            [(source.name, model) for source, model in zip(self.sources, self.views)] if len(self.sources) > 1 else []
        )
        chart.update_titles()
        status = self.query_one(StatusBar)
        status.position = (self.focus_index + 1, len(self.sources)) if len(self.sources) > 1 else None
        self.view.changed |= {STATUS, CHART, EXPERTS, SAMPLES, LOG}
        self._bindings_state = ""

    # -- commands ------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action in DASHBOARD_ACTIONS and isinstance(self.screen, ModalScreen):
            return False  # while a dialog is open, its keys belong to the dialog
        if action in ("next_run", "toggle_x"):  # hidden where they mean nothing
            return len(self.sources) > 1
        if action == "add_run":
            return self.add_run_source is not None
        if action == "stop_run" and (self.local is not None or not self.sources):
            return False  # S is a viewer's: in the training dashboard q stops training
        if action in TRAINER_ACTIONS:
            if action in ("pause", "resume"):  # one space key, two meanings: show the one that applies
                paused = self.view.state == State.PAUSED
                if (action == "resume") != paused:
                    return False
            source = self.source
            if source is None or self.stopping:
                return None  # shown greyed out in the Footer, the key does nothing
            if action == "sample" and not source.live:
                return True  # no live trainer: the viewer samples from the latest checkpoint itself
            if not source.live or self.view.state not in TRAINER_ACTIONS[action]:
                return None
            return True
        return True

    def _send(self, pending: str, command) -> None:
        command()
        self.view.request(pending)
        self.refresh_panels()  # the key's effect shows now, not at the next drain
        if self._answer_watch is None:  # and the trainer's answer shows within 50 ms of arriving
            self._answer_watch = self.set_interval(ANSWER_POLL_SECONDS, self._drain_until_answered)

    def _drain_until_answered(self) -> None:
        self.drain()
        if self.view.pending is None and self._answer_watch is not None:
            self._answer_watch.stop()
            self._answer_watch = None

    def action_pause(self) -> None:
        self._send("pausing", lambda: self.source.command("pause"))

    def action_resume(self) -> None:
        self._send("resuming", lambda: self.source.command("resume"))

    def action_save(self) -> None:
        self._send("saving", lambda: self.source.command("save"))

    def action_evaluate(self) -> None:
        self._send("evaluating", lambda: self.source.command("eval"))

    def action_sample(self) -> None:
        source = self.source

        def sample(request: SampleRequest | None) -> None:
            if request is not None and not self.stopping:
                self.last_request = request
                self._send("sampling", lambda: source.sample(request))

        self.push_screen(SampleDialog(self.last_request, self._check_request), sample)

    def _check_request(self, request: SampleRequest) -> None:
        request.check()
        self.source.vocab.encode(request.prompt)  # unknown characters: UserError, shown in the dialog

    def action_stop_run(self) -> None:
        source = self.source
        message = (
            f"Stop training run {source.name}?\nIts trainer saves a checkpoint and exits; continue later "
            f"with\n{source.resume_hint}"
        )
        self.push_screen(
            ConfirmQuit(message, "Stop (y)"), lambda yes: yes and self._send("stopping", lambda: source.command("stop"))
        )

    def action_toggle_log_y(self) -> None:
        chart = self.query_one(LossChart)
        chart.log_y = not chart.log_y

    def action_toggle_window(self) -> None:
        chart = self.query_one(LossChart)
        chart.recent = not chart.recent

    def action_toggle_x(self) -> None:
        chart = self.query_one(LossChart)
        chart.by_time = not chart.by_time

    def action_next_run(self) -> None:
        self.focus_index = (self.focus_index + 1) % len(self.sources)
        self._show_focus()
        self.refresh_panels()

    def action_add_run(self) -> None:
        def add(name: str | None) -> None:
            if not name:
                return
            try:
                source = self.add_run_source(name)
            except UserError as err:  # another user's socket, another protocol: said, not crashed on
                self.notify(str(err), severity="error", timeout=10)
                return
            self.sources.append(source)
            self.views.append(RunView())
            self._generations.append(source.generation)
            self.focus_index = len(self.sources) - 1
            self._show_focus()
            self.drain()

        self.push_screen(AddRunDialog(self._check_run_name), add)

    def _check_run_name(self, name: str) -> None:
        if name in (source.name for source in self.sources):
            raise UserError(f"run '{name}' is on screen already; press n to move between runs")
        self.add_run_source(name, check_only=True)

    def action_experts(self) -> None:
        self.push_screen(ExpertsScreen(self.view))

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        if self.stopping:
            return
        if self.local is None or not self.local.live:  # a viewer: training goes on without it
            self.exit(self.exit_code, return_code=self.exit_code)
            return
        if self.view.state == State.FINISHED:
            message = "Quit? Training has finished; the final checkpoint is saved."
        elif self.view.state == State.ERROR:
            message = (
                f"Quit? Training stopped on an error and the last good checkpoint is kept;\n"
                f"continue from it with a lower learning rate:\n{self.resume_hint} --lr <lower>"
            )
        else:
            message = f"Stop training and quit?\nA checkpoint is saved first; continue later with\n{self.resume_hint}"
        self.push_screen(ConfirmQuit(message), lambda yes: yes and self.stop_and_exit(0, "quit"))

    def action_interrupt(self) -> None:
        """Ctrl-C: no question asked (the terminal sends it as a key, not as SIGINT)."""
        if not self.stopping:
            self.stop_and_exit(signal_exit_code(signal.SIGINT), "interrupted")

    def stop_and_exit(self, code: int, reason: str) -> None:
        """Ask this process's trainer to save and stop; the app exits when it has returned. A viewer
        just leaves."""
        self.stopping = True
        self.exit_code = 1 if self.view.state == State.ERROR and code == 0 else code
        if isinstance(self.screen, ModalScreen):
            self.pop_screen()
        if self.local is None or not self.local.live:
            self.exit(self.exit_code, return_code=self.exit_code)
            return
        self._send("saving and quitting", lambda: self.local.stop(reason))

    def on_unmount(self) -> None:
        # However the app ends, this process's trainer must return (unless the terminal went away and
        # training goes on without a screen), or the interpreter would wait for its thread.
        if self.local is not None and self.local.live and not self.hung_up:
            self.local.stop("dashboard closed")
        for source in self.sources:
            if source is not self.local:
                source.close()
