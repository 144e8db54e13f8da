"""The event bus: one trainer, any number of subscribers (reporter, dashboard, control channel, ...).

    bus = EventBus()
    trainer.on_event = bus
    unsubscribe = bus.subscribe(print)

Subscribers are called on the thread that publishes (the training thread, mostly), so each must be
quick: put the event on a queue, write a line. One that raises is dropped with a warning to the
others, so a broken subscriber can never stop training.
"""

from __future__ import annotations

import threading
from typing import Callable

from moe_core.events import Event, EventSink, Notice


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[EventSink] = []
        self._lock = threading.Lock()

    def subscribe(self, sink: EventSink) -> Callable[[], None]:
        """Add a subscriber; returns the function that removes it."""
        with self._lock:
            self._subscribers = [*self._subscribers, sink]
        return lambda: self.unsubscribe(sink)

    def unsubscribe(self, sink: EventSink) -> None:
        with self._lock:
            self._subscribers = [s for s in self._subscribers if s is not sink]

    def __call__(self, event: Event) -> None:
        for sink in self._subscribers:  # a snapshot: (un)subscribing from another thread is safe
            try:
                sink(event)
            except Exception as err:  # noqa: BLE001 - whatever a subscriber does wrong, training goes on
                self.unsubscribe(sink)
                self(
                    Notice(
                        "warning",
                        f"{_name(sink)} stopped receiving events after an error: {err!r}",
                        getattr(event, "step", 0),
                    )
                )


def _name(sink: EventSink) -> str:
    owner = getattr(sink, "__self__", sink)
    return getattr(owner, "name", None) or type(owner).__name__
