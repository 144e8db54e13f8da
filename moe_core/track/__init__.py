"""Experiment trackers (TensorBoard, MLflow, Weights & Biases, Trackio): subscribers of the event bus.

    tracking = Tracking(config, run, bus)     # one sink per name in config.track, each on its own thread
    trainer.run()
    tracking.close()                          # send what is queued, end the tracked runs

The training loop knows nothing of them: they receive the same events as the dashboard. Each backend
is one module of this package that defines `TRACKER`, a subclass of `base.Tracker` (see tensorboard.py,
the shortest); a new module is a new `--track` name. Its package is an optional extra of moe-tui.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from functools import cache
from typing import Callable, Iterable

from moe_core.config import Config
from moe_core.errors import UserError
from moe_core.events import Event, Notice
from moe_core.store.runs import Run
from moe_core.track.base import Tracker
from moe_core.track.sink import CLOSE_TIMEOUT, TrackerSink, TrackerState, finish

SAY_WAITING_AFTER = 2.0  # seconds of waiting for the trackers at the end before saying so

__all__ = ["Tracker", "Tracking", "check_trackers", "trackers", "where_written"]


@cache
def trackers() -> dict[str, type[Tracker]]:
    """Every tracker module in this package, by its --track name (importing none of their packages)."""
    found: dict[str, type[Tracker]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            tracker = getattr(importlib.import_module(f"{__name__}.{info.name}"), "TRACKER", None)
            if tracker is not None:
                found[tracker.name] = tracker
    return dict(sorted(found.items()))


def check_trackers(names: Iterable[str], flag: str = "--track") -> None:
    """Each name is a tracker whose package imports: else one line naming the extra to install."""
    known = trackers()
    for name in names:
        if name not in known:
            raise UserError(f"unknown tracker '{name}'; {flag} takes one of {', '.join(known)}")
        tracker = known[name]
        try:
            importlib.import_module(tracker.package)
        except ImportError as err:
            raise UserError(
                f"{flag} {name} needs the {tracker.package} package, which is not installed ({err}); "
                f"install it with `pip install 'moe-tui[{tracker.extra_name()}]'` ('moe-tui[track]' "
                "installs every tracker)"
            ) from None


class Tracking:
    """The sinks of one run, subscribed to `bus` (or fed recorded events by `replay`)."""

    def __init__(
        self,
        config: Config,
        run: Run,
        bus=None,
        names: Iterable[str] | None = None,
        publish: Callable[[Event], None] | None = None,
        backends: Iterable[Tracker] = (),
    ):
        names = list(dict.fromkeys(config.track if names is None else names))
        check_trackers(names)
        self.bus = bus
        state = TrackerState(run)
        project = config.track_project
        publish = publish or bus or (lambda event: None)
        self.publish, self.closed = publish, False
        chosen = [trackers()[name](run, project, state.entry(name)) for name in names] + list(backends)
        self.sinks = [TrackerSink(tracker, config, state, publish) for tracker in chosen]
        if bus is not None:
            for sink in self.sinks:
                bus.subscribe(sink)

    def replay(self, events: list[Event]) -> None:
        for sink in self.sinks:
            sink.replay(events)

    @property
    def failed(self) -> bool:
        return any(sink.failed for sink in self.sinks)

    def close(self, outcome: str | None = None, timeout: float | None = CLOSE_TIMEOUT) -> None:
        """Send what is queued and end each tracked run, waiting up to `timeout` seconds for all of them
        together (None: as long as it takes); a second call does nothing."""
        if self.closed:
            return
        self.closed = True
        for sink in self.sinks:
            if self.bus is not None:
                self.bus.unsubscribe(sink)
            if outcome is not None:
                sink.outcome = outcome
            sink.stop()
        deadline = None if timeout is None else time.monotonic() + timeout
        say_at = (
            time.monotonic() + SAY_WAITING_AFTER
            if deadline is None
            else min(deadline, time.monotonic() + SAY_WAITING_AFTER)
        )
        busy = [sink.name for sink in self.sinks if not sink.stopped_within(max(0.0, say_at - time.monotonic()))]
        if busy:  # a slow server, say: tell the user what the terminal is waiting for
            limit = "" if timeout is None else f" (up to {timeout:.0f} s)"
            self.publish(Notice("info", f"sending what is left to {', '.join(busy)}{limit}", 0))
        finish(self.sinks, deadline)

    def __enter__(self) -> "Tracking":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def where_written(run: Run) -> list[str]:
    """For `moe-tui runs show`: one line per tracker this run was sent to."""
    lines = []
    for name, entry in TrackerState.read(run).items():
        tracker = trackers().get(name)
        if tracker is not None and isinstance(entry, dict) and entry:
            lines.append(f"{name}: {tracker.describe(run, entry)}")
    return lines
