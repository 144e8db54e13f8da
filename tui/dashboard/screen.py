"""The dashboard's one screen: the panels of the run in focus, and the keys that act on it.

The `Dashboard` app under it (tui/dashboard/app.py) holds the runs and how the process ends; this
screen draws their views and turns keys into commands for the run in focus.
"""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid
from textual.screen import Screen
from textual.widgets import Static

from moe_core.errors import UserError
from moe_core.events import State
from moe_core.model.request import SampleRequest
from moe_core.train.settings import checked_changes
from tui.dashboard.experts_screen import ExpertsScreen
from tui.dashboard.forking import start_fork
from tui.dashboard.probe_screen import ProbeScreen
from tui.dashboard.run_view import CHART, EXPERTS, LOG, SAMPLES, STATUS, RunView
from tui.dashboard.screens import AddRunDialog, ConfirmQuit, HelpScreen, SampleDialog, SettingsDialog
from tui.dashboard.widgets.experts import ExpertPanel
from tui.dashboard.widgets.footer import KeyFooter
from tui.dashboard.widgets.loss_chart import LossChart
from tui.dashboard.widgets.panels import EventsLog, SamplesPanel
from tui.dashboard.widgets.status import StatusBar

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
    "settings": (*BUSY, PAUSED, FINISHED),  # never in ERROR: resume with the new settings instead
    "fork": (PAUSED,),  # from the step it stands at: saved first
    "stop_run": (*BUSY, PAUSED, FINISHED, ERROR),
}


class DashboardScreen(Screen):
    BINDINGS = [  # the Footer shows them in this order, as many as fit: the chart's own toggles last
        Binding("space", "pause", "Pause"),
        Binding("space", "resume", "Resume"),  # the Footer shows whichever of the two applies
        Binding("s", "sample", "Sample"),
        Binding("c", "save", "Save"),
        Binding("e", "evaluate", "Eval"),
        Binding("o", "settings", "Settings"),
        Binding("r", "experts", "Experts"),
        Binding("S", "stop_run", "Stop run"),
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("p", "probe", "Probe"),
        Binding("f", "fork", "Fork"),
        Binding("l", "toggle_log_y", "Log-y"),
        Binding("w", "toggle_window", "Window"),
        Binding("x", "toggle_x", "Step/time"),
        Binding("k", "colour_samples", "Colour"),
        Binding("n", "next_run", "Next run"),
        Binding("a", "add_run", "Add run"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._answer_watch = None  # a Timer, while a command waits for its answer
        self._charts_drawn_at = -CHART_SECONDS
        self._bindings_state = ""

    @property
    def view(self) -> RunView:
        return self.app.view

    def compose(self) -> ComposeResult:
        yield StatusBar(self.view, id="status")
        yield Static(id="error-banner")
        with Grid(id="panels"):
            yield LossChart(self.view, id="loss-chart")
            yield ExpertPanel(self.view, id="experts")
            yield SamplesPanel(self.view, "samples · newest first", id="samples")
            yield EventsLog(self.view, "events", id="events")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.show_focus()
        self.app.start_pump()

    def refresh_panels(self) -> None:
        changed = set(self.view.changed)
        for view in self.app.views:  # the others' changes reach the screen through the chart's overlay only
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

    def show_focus(self) -> None:
        """Point every panel at the run in focus (and the chart at all of them)."""
        for widget in (StatusBar, ExpertPanel, SamplesPanel, EventsLog):
            self.query_one(widget).view = self.view
        chart = self.query_one(LossChart)
        chart.view = self.view
        chart.overlay = (
            [(source.name, model) for source, model in zip(self.app.sources, self.app.views)]
            if len(self.app.sources) > 1
            else []
        )
        chart.update_titles()
        status = self.query_one(StatusBar)
        status.position = (self.app.focus_index + 1, len(self.app.sources)) if len(self.app.sources) > 1 else None
        self.view.changed |= {STATUS, CHART, EXPERTS, SAMPLES, LOG}
        self._bindings_state = ""

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action in ("next_run", "toggle_x"):  # hidden where they mean nothing
            return len(self.app.sources) > 1
        if action == "add_run":
            return self.app.add_run_source is not None
        if action == "fork" and self.app.local is None:
            return False  # the training dashboard's: it knows the step it stands at
        if action == "stop_run" and (self.app.local is not None or not self.app.sources):
            return False  # S is a viewer's: in the training dashboard q stops training
        if action == "probe":  # a live trainer answers; a viewer without one reads the latest checkpoint
            source = self.app.source
            usable = source is not None and not self.app.stopping and (source.live or self.app.local is None)
            return True if usable else None
        if action in TRAINER_ACTIONS:
            if action in ("pause", "resume"):  # one space key, two meanings: show the one that applies
                paused = self.view.state == State.PAUSED
                if (action == "resume") != paused:
                    return False
            source = self.app.source
            if source is None or self.app.stopping:
                return None  # shown greyed out in the Footer, the key does nothing
            if action == "sample" and not source.live:
                return True  # no live trainer: the viewer samples from the latest checkpoint itself
            if not source.live or self.view.state not in TRAINER_ACTIONS[action]:
                return None
            return True
        return True

    def send(self, pending: str, command) -> None:
        command()
        self.view.request(pending)
        self.refresh_panels()  # the key's effect shows now, not at the next drain
        if self._answer_watch is None:  # and the trainer's answer shows within 50 ms of arriving
            self._answer_watch = self.set_interval(ANSWER_POLL_SECONDS, self._drain_until_answered)

    def _drain_until_answered(self) -> None:
        self.app.drain()
        if self.view.pending is None and self._answer_watch is not None:
            self._answer_watch.stop()
            self._answer_watch = None

    def action_pause(self) -> None:
        self.send("pausing", lambda: self.app.source.command("pause"))

    def action_resume(self) -> None:
        self.send("resuming", lambda: self.app.source.command("resume"))

    def action_save(self) -> None:
        self.send("saving", lambda: self.app.source.command("save"))

    def action_evaluate(self) -> None:
        self.send("evaluating", lambda: self.app.source.command("eval"))

    def action_sample(self) -> None:
        source = self.app.source

        def sample(request: SampleRequest | None) -> None:
            if request is not None and not self.app.stopping:
                self.app.last_request = request
                self.send("sampling", lambda: source.sample(request))

        self.app.push_screen(SampleDialog(self.app.last_request, self._check_request), sample)

    def action_settings(self) -> None:
        source = self.app.source

        def change(changes: dict | None) -> None:
            if changes and not self.app.stopping:
                source.change_settings(changes)

        current = source.settings()
        self.app.push_screen(SettingsDialog(current, lambda raw: checked_changes(current, raw)), change)

    def action_fork(self) -> None:
        """Fork here: save this step, ask for the settings to change, start the fork in the background."""
        source, step = self.app.source, self.view.step
        source.command("save")
        current = source.settings()

        def start(changes: dict | None) -> None:
            if changes is not None:
                name = f"{source.name}-fork{step}"
                self.app.notify(f"starting {name} ...", title="fork", timeout=5)
                start_fork(source.run, step, changes, name, lambda said: self.app.call_from_thread(self.forked, said))

        title = f"Fork {source.name} at step {step}: settings to change (KEY=VALUE ..., or none)"
        self.app.push_screen(SettingsDialog(current, lambda raw: checked_changes(current, raw), title), start)

    def forked(self, said: str) -> None:
        """What the fork's launch said: how to watch it, or why it did not start."""
        failed = said.startswith("error:")
        self.app.notify(said, title="fork", severity="error" if failed else "information", timeout=20)
        self.view.note("error" if failed else "info", "; ".join(line.strip() for line in said.splitlines()))

    def _check_request(self, request: SampleRequest) -> None:
        request.check()
        self.app.source.vocab.encode(request.prompt)  # unknown characters: UserError, shown in the dialog

    def action_stop_run(self) -> None:
        source = self.app.source
        message = (
            f"Stop training run {source.name}?\nIts trainer saves a checkpoint and exits; continue later "
            f"with\n{source.resume_hint}"
        )
        self.app.push_screen(
            ConfirmQuit(message, "Stop (y)"), lambda yes: yes and self.send("stopping", lambda: source.command("stop"))
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
        self.app.focus_index = (self.app.focus_index + 1) % len(self.app.sources)
        self.show_focus()
        self.refresh_panels()

    def action_add_run(self) -> None:
        def add(name: str | None) -> None:
            if not name:
                return
            try:
                source = self.app.add_run_source(name)
            except UserError as err:  # another user's socket, another protocol: said, not crashed on
                self.app.notify(str(err), severity="error", timeout=10)
                return
            self.app.add_source(source)
            self.show_focus()
            self.app.drain()

        self.app.push_screen(AddRunDialog(self._check_run_name), add)

    def _check_run_name(self, name: str) -> None:
        if name in (source.name for source in self.app.sources):
            raise UserError(f"run '{name}' is on screen already; press n to move between runs")
        self.app.add_run_source(name, check_only=True)

    def action_experts(self) -> None:
        self.app.push_screen(ExpertsScreen(self.view))

    def action_probe(self) -> None:
        self.app.push_screen(ProbeScreen(self.view, self.app.source))

    def action_colour_samples(self) -> None:
        """Samples plain, then coloured by the experts of layer 1, 2, ..., then plain again."""
        layers = max((len(s.experts) for s in self.view.samples if s.experts), default=0)
        layer = self.view.sample_layer
        self.view.sample_layer = None if layers == 0 or layer == layers - 1 else (0 if layer is None else layer + 1)
        self.view.changed.add(SAMPLES)
        self.refresh_panels()

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        if self.app.stopping:
            return
        if self.app.local is None or not self.app.local.live:  # a viewer: training goes on without it
            self.app.exit(self.app.exit_code, return_code=self.app.exit_code)
            return
        if self.view.state == State.FINISHED:
            message = "Quit? Training has finished; the final checkpoint is saved."
        elif self.view.state == State.ERROR:
            message = (
                f"Quit? Training stopped on an error and the last good checkpoint is kept;\n"
                f"continue from it with a lower learning rate:\n{self.app.resume_hint} --lr <lower>"
            )
        else:
            message = (
                f"Stop training and quit?\nA checkpoint is saved first; continue later with\n{self.app.resume_hint}"
            )
        self.app.push_screen(ConfirmQuit(message), lambda yes: yes and self.app.stop_and_exit(0, "quit"))
