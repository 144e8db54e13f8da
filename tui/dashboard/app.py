"""The training dashboard: a thin App over one screen (tui/dashboard/screen.py), for a run training here
or for any runs watched from elsewhere. The App holds the runs and how the process ends.

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

from textual.app import App
from textual.binding import Binding
from textual.screen import ModalScreen

from moe_core.events import Event, State
from moe_core.model.request import SampleRequest
from moe_core.signals import signal_exit_code, signal_reason
from tui.dashboard.run_view import CHART, STATUS, RunView
from tui.dashboard.screen import DashboardScreen
from tui.dashboard.sources import LocalTrainer
from tui.notify import notification

DRAIN_SECONDS = 0.25  # UI refresh period: a few updates a second, whatever the training speed
# One ring (the bell, a desktop notification, a toast) per guard rule in this long, a toast's life: the
# events panel lists every alert, and a rule tripping again and again must not flood the desktop.
RING_SECONDS = 15.0


class Dashboard(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "moe-tui"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [Binding("ctrl+c", "interrupt", "Interrupt", show=False, priority=True)]

    def __init__(
        self,
        trainer=None,
        *,
        replay: Iterable[Event] = (),
        resume_hint: str = "",
        torch_threads: int | None = None,
        sources: list | None = None,
        bus=None,
        add_run=None,
    ) -> None:
        super().__init__()
        self.local = LocalTrainer(trainer, bus, torch_threads) if trainer is not None else None
        self.sources = [self.local] if self.local else list(sources or [])
        self.views = [RunView() for _ in self.sources] or [RunView()]
        self._generations = [source.generation for source in self.sources]
        self.focus_index = 0
        self.resume_hint = resume_hint
        self.add_run_source = add_run  # name -> a new source, for the `a` key of a viewer
        for event in replay:
            self.views[0].apply(event)
        self.dashboard = DashboardScreen()
        self._alerts_rung: list[int] | None = None  # alerts seen per run: those in its history ring no bell
        self._rung_at: dict[str, float] = {}  # guard rule -> when it last rang (RING_SECONDS)
        self.exit_code = 0
        self.stopping = False
        self.signal_received: int | None = None  # set by the signal handler, acted on by `drain`
        self.hung_up = False  # the terminal is gone: leave the screen, keep training (see runner.py)
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

    def get_default_screen(self) -> DashboardScreen:
        return self.dashboard

    def start_pump(self) -> None:
        """Once the screen is up: the first drain, the pump, this process's trainer."""
        self.drain()  # a replayed stream, a watched run's history: on the very first frame
        self.set_interval(DRAIN_SECONDS, self.drain)
        if self.local is not None:
            self.local.start()

    def drain(self) -> None:
        """Fold new events into each run's state, redraw what changed, act on a received signal."""
        if not self.is_running:  # shutting down: a tick can land after the panels are gone
            return
        if self.hung_up:  # the terminal is gone: leave the screen; training goes on (see runner.py)
            self.exit(0, return_code=0)
            return
        for i, source in enumerate(self.sources):
            events = source.poll()
            if source.generation != self._generations[i]:  # its history was rewritten: start afresh
                self._generations[i] = source.generation
                self.views[i] = RunView()
                if i == self.focus_index:
                    self.dashboard.show_focus()
            for event in events:
                self.views[i].apply(event)
            self.views[i].observe_step(source.step)
        self._ring_for_new_alerts()
        if len(self.views) > 1 and any(m.changed & {CHART} for m in self.views):
            self.view.changed.add(CHART)  # another run's curve moved
        if self.local is not None and not self.local.live and self.local.outcome is not None:
            self._trainer_returned()
        if self.signal_received is not None and not self.stopping:
            self.stop_and_exit(signal_exit_code(self.signal_received), signal_reason(self.signal_received))
        self.dashboard.refresh_panels()

    def _ring_for_new_alerts(self) -> None:
        """A new guard alert on any run: the bell, a desktop notification, a toast."""
        if self._alerts_rung is None or len(self._alerts_rung) != len(self.views):  # a source's history: no ring
            old = list(self._alerts_rung or [])
            self._alerts_rung = old + [view.alerts_seen for view in self.views[len(old) :]]
            return
        new = [view.alerts_seen > rung for view, rung in zip(self.views, self._alerts_rung)]
        self._alerts_rung = [view.alerts_seen for view in self.views]
        if not any(new):
            return
        alert = next(view.alert for view, fresh in zip(self.views, new) if fresh)
        now = time.monotonic()
        if now - self._rung_at.get(alert.rule, -RING_SECONDS) < RING_SECONDS:
            return
        self._rung_at[alert.rule] = now
        try:
            self._driver.write(notification("moe-tui", alert.message))  # noqa: SLF001 - Textual's own output
        except (AttributeError, OSError):
            self.bell()
        self.notify(alert.message, title=f"guard: {alert.rule}", severity="warning", timeout=RING_SECONDS)

    def add_source(self, source) -> None:
        """Watch one more run (a viewer's `a` key), and put it in focus."""
        self.sources.append(source)
        self.views.append(RunView())
        self._generations.append(source.generation)
        self.focus_index = len(self.sources) - 1

    def _trainer_returned(self) -> None:
        if self.stopping:
            self.exit(self.exit_code, return_code=self.exit_code)
        elif self.local.crash is not None and self.view.error is None:  # a bug, not a training failure
            self.view.error = f"the training thread crashed: {self.local.crash!r}"
            self.view.state = State.ERROR
            self.view.changed.add(STATUS)
        elif self.local.crash is None:  # stopped from outside (`moe-tui stop`, a viewer): nothing left to show
            self.exit(0, return_code=0)

    # -- how the process ends ------------------------------------------------------------------

    async def action_quit(self) -> None:
        """Textual's own quit key (ctrl+q) asks as `q` does: quitting stops this process's trainer."""
        if not isinstance(self.screen, ModalScreen):
            await self.dashboard.action_quit()

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
        self.dashboard.send("saving and quitting", lambda: self.local.stop(reason))

    def on_unmount(self) -> None:
        # However the app ends, this process's trainer must return (unless the terminal went away and
        # training goes on without a screen), or the interpreter would wait for its thread.
        if self.local is not None and self.local.live and not self.hung_up:
            self.local.stop("dashboard closed")
        for source in self.sources:
            if source is not self.local:
                source.close()
