"""The commands a front end sends the training loop: queued from any thread, acted on between steps."""

from __future__ import annotations

import queue
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moe_core.events import Alert
    from moe_core.model.sampling import SampleRequest
    from moe_core.probe.request import ProbeRequest


class Control:
    """Commands from a front end, safe to call from any thread and from a signal handler; the loop acts
    between steps."""

    def __init__(self) -> None:
        # A SimpleQueue, whose put is reentrant: a stop signal's handler runs on the main thread, possibly
        # in the middle of the loop's own `next()`, where a Queue's lock would already be held (a hang).
        self._commands: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()

    def pause(self) -> None:
        self._commands.put(("pause", None))

    def resume(self) -> None:
        self._commands.put(("resume", None))

    def toggle_pause(self) -> None:
        self._commands.put(("toggle", None))

    def stop(self, reason: str = "") -> None:
        """Finish the current step, save a checkpoint and return from `run()`."""
        self._commands.put(("stop", reason))

    def sample(self, request: SampleRequest) -> None:
        self._commands.put(("sample", request))

    def save(self) -> None:
        self._commands.put(("save", None))

    def evaluate(self) -> None:
        self._commands.put(("eval", None))

    def alert(self, alert: Alert) -> None:
        """A rule of the guard tripped: the loop logs it and warns, pauses or stops, between two steps."""
        self._commands.put(("alert", alert))

    def set(self, changes: dict[str, object], source: str = "") -> None:
        """Change settings of the live run between two steps (checked there: moe_core/train/settings.py)."""
        self._commands.put(("set", (dict(changes), source)))

    def probe(self, request: ProbeRequest) -> None:
        """Probe the weights as they are between two steps (moe_core/probe): the answer is a `Probed` event."""
        self._commands.put(("probe", request))

    def next(self, wait: float | None) -> tuple[str, object] | None:
        try:
            return self._commands.get(timeout=wait) if wait else self._commands.get_nowait()
        except queue.Empty:
            return None
