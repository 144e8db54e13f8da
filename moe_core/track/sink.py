"""What keeps a tracker off the training thread: `TrackerSink`, the bus subscriber that runs one backend
on a queue and worker thread of its own, and the run's `trackers.json` (`TrackerState`).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from pathlib import Path
from queue import Empty, Full, Queue
from typing import Any, Callable

from moe_core.atomic import atomic_write_text
from moe_core.config import Config
from moe_core.events import LIVE_ONLY, Event, Notice, RunStarted, State, StateChanged
from moe_core.store.runs import Run
from moe_core.track.base import Tracker, run_params, send

QUEUE_SIZE = 10_000  # events waiting for one tracker; past that they are dropped (with one warning)
CLOSE_TIMEOUT = 60.0  # seconds the trackers may take, together, to send what is queued when training ends
ABANDON_GRACE = 10.0  # past that, seconds a tracker still gets to end its run, what was queued dropped


class TrackerState:
    """`runs/NAME/trackers.json`: per tracker, what continuing its run needs (ids, where it wrote) and
    the last step it was sent. Shared by the sinks of one process, hence the lock."""

    FILE = "trackers.json"

    def __init__(self, run: Run):
        self.path = Path(run.path) / self.FILE
        self.lock = threading.Lock()
        self.entries: dict[str, dict[str, Any]] = self.read(run)

    @classmethod
    def read(cls, run: Run) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads((Path(run.path) / cls.FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def entry(self, name: str) -> dict[str, Any]:
        with self.lock:
            return self.entries.setdefault(name, {})

    def save(self) -> None:
        with self.lock:  # the copies are taken whole (under the GIL) while other sinks may update theirs
            # (Not the empty entries of trackers that never opened a run.)
            snapshot = {name: dict(entry) for name, entry in list(self.entries.items()) if entry}
            atomic_write_text(self.path, json.dumps(snapshot, indent=1, sort_keys=True) + "\n")


def finish(sinks: list[TrackerSink], deadline: float | None) -> None:
    """Wait for stopped sinks to end their tracked runs, all by `deadline` (time.monotonic(); None: no
    limit); then those still busy drop what they hold and get ABANDON_GRACE seconds more, together."""

    def left(until: float | None) -> float | None:
        return None if until is None else max(0.0, until - time.monotonic())

    late = [sink for sink in sinks if not sink.stopped_within(left(deadline))]
    grace = time.monotonic() + ABANDON_GRACE
    for sink in late:
        sink.abandon()
    for sink in late:
        sink.stopped_within(left(grace))
    for sink in sinks:
        sink.publish_notices()


class TrackerSink:
    """A bus subscriber that hands events to one tracker on a worker thread of its own.

    The training thread only puts events on a bounded queue: a full queue drops events (one warning),
    a tracker that raises is turned off (one warning) and training goes on. Warnings are published on
    the bus from the thread that publishes, at its next event, or at `close`.
    """

    def __init__(
        self,
        tracker: Tracker,
        config: Config,
        state: TrackerState,
        publish: Callable[[Event], None],
        queue_size: int = QUEUE_SIZE,
    ):
        self.tracker, self.config, self.state, self.publish = tracker, config, state, publish
        self.name = tracker.name
        self.entry = state.entry(tracker.name)
        self.queue: Queue = Queue(maxsize=queue_size)
        self.failed = self.dropped = False
        self.opened = False
        self.skip_through = -1  # steps the tracked run already holds (continuing without a rewind)
        self.outcome = State.STOPPED
        self.stopping = threading.Event()  # set by `stop`: end the tracked run once the queue is empty
        self.abandoned = False  # set when `wait` runs out of time: drop what is queued, end the run
        self._notices: deque[Notice] = deque()
        self._step = 0
        self.thread = threading.Thread(target=self._work, name=f"tracker-{tracker.name}", daemon=True)
        self.thread.start()

    # -- the publishing thread -----------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        self.publish_notices()
        if (
            self.failed
            or isinstance(event, Notice)
            or (isinstance(event, LIVE_ONLY) and not isinstance(event, StateChanged))
        ):
            return
        self._step = getattr(event, "step", self._step)
        try:
            self.queue.put_nowait(event)
        except Full:
            if not self.dropped:
                self.dropped = True
                self._notices.append(
                    Notice(
                        "warning",
                        f"tracker {self.name} is falling behind: events are being dropped for it; training goes on",
                        self._step,
                    )
                )

    def replay(self, events: list[Event]) -> None:
        """Feed recorded events (`moe-tui export`), waiting for room rather than dropping any."""
        self.tracker.live_alerts = False  # alerts of the past are history, not news
        for event in events:
            if self.failed:
                break
            self.queue.put(event)

    def close(self, timeout: float | None = CLOSE_TIMEOUT) -> None:
        """Send what is queued, end the tracked run, and publish any warning left."""
        self.stop()
        finish([self], None if timeout is None else time.monotonic() + timeout)

    def stop(self) -> None:
        self.stopping.set()

    def stopped_within(self, seconds: float | None) -> bool:
        self.thread.join(seconds)
        return not self.thread.is_alive()

    def abandon(self) -> None:
        """Out of time: drop what is still queued, and end the tracked run once the call in progress returns."""
        self.abandoned = True
        if not self.failed:
            self._notices.append(
                Notice(
                    "warning",
                    f"tracker {self.name} did not finish sending in time; what it had not sent is "
                    f"missing there (`moe-tui export {self.tracker.run.name} --to {self.name}` sends it "
                    "later)",
                    self._step,
                )
            )

    def publish_notices(self) -> None:
        while self._notices:
            try:
                notice = self._notices.popleft()
            except IndexError:
                return
            self.publish(notice)

    # -- the worker thread ---------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            try:
                event = self.queue.get(timeout=0.1)
            except Empty:
                if self.stopping.is_set():
                    break
                continue
            if not (self.failed or self.abandoned):  # else dropped: the queue empties, nothing waits on it
                self._guarded(lambda: self._handle(event))
        if self.opened and self.failed:
            try:  # end what it can of the tracked run; it has warned once already
                self.tracker.close(State.ERROR)
            except Exception:  # noqa: BLE001
                pass
        elif self.opened:
            self._guarded(lambda: self.tracker.close(self.outcome))
            if not self.failed:  # its status is final there: `moe-tui export` need not reopen it
                self.entry["closed"] = True
                self._guarded(self.state.save)

    def _guarded(self, action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception as err:  # noqa: BLE001 - a tracker's failure is never training's
            self.failed = True
            message = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            self._notices.append(
                Notice(
                    "warning",
                    f"tracker {self.name} failed ({message}); it is off for the rest of this run, training goes on",
                    self._step,
                )
            )

    def _handle(self, event: Event) -> None:
        if isinstance(event, StateChanged):
            if event.state in (State.FINISHED, State.ERROR) or (
                event.state == State.STOPPED and self.outcome == State.STOPPED
            ):
                self.outcome = event.state  # a dashboard's finished run is stopped when the user quits: finished
            return
        if not self.opened:
            self._open(event if isinstance(event, RunStarted) else None)
        if isinstance(event, RunStarted):
            return
        step = getattr(event, "step", None)
        if step is None or step <= self.skip_through:
            return
        self._send(event, step)

    def _send(self, event: Event, step: int) -> None:
        if step > self.entry.get("last_step", -1):  # written before sending: a crash never sends a step twice
            self.entry["last_step"] = step
            self.state.save()
        try:
            send(self.tracker, event)
        except Exception:
            # Not sent: the step counts as missing, so that `moe-tui export` or the next resume sends it
            # (with any of its events sent before this one: a step repeated beats a step lost).
            self.entry["last_step"] = min(self.entry["last_step"], step - 1)
            self.state.save()
            raise

    def _open(self, started: RunStarted | None) -> None:
        continuing = bool(self.entry)  # this run was sent to this tracker before: continue it
        start_step = started.start_step if started is not None else 0
        held = self.entry.get("last_step", -1)  # the tracked run holds the steps up to here
        kept = self.entry.get("project")  # the project it started in, which it stays in
        if continuing and not self.tracker.rewinds:
            self.skip_through = self.entry.get("last_step", -1)
        self.tracker.open(run_params(self.config, started), start_step, continuing)
        self.opened = True
        self.entry["closed"] = False  # until `close`: a crash leaves it open (RUNNING in MLflow, say)
        self.entry.setdefault("last_step", start_step if self.tracker.rewinds else self.skip_through)
        if self.tracker.rewinds:
            self.entry["last_step"] = start_step
        self.state.save()
        if started is not None and started.resumed and held < start_step:
            self._backfill(held, start_step)
        if kept is not None and kept != self.config.track_project:
            self._notices.append(
                Notice(
                    "warning",
                    f"tracker {self.name} goes on with its tracked run in project '{kept}', "
                    f"where it started (a run cannot move); --track-project {self.config.track_project} applies "
                    "to trackers this run has not used before",
                    start_step,
                )
            )
        self._notices.append(
            Notice("info", f"tracker {self.name}: {self.tracker.describe(self.tracker.run, self.entry)}", start_step)
        )

    def _backfill(self, held: int, through: int) -> None:
        """A resumed run whose tracked run lacks steps it logged before (tracking added on this resume, or
        a tracker that failed last time): send them from metrics.jsonl, steps after `held` to `through`."""
        self.tracker.live_alerts = False  # the alerts it sends again are history, not news
        for event in self.tracker.run.events():
            step = getattr(event, "step", None)
            if not (isinstance(step, int) and held < step <= through):
                continue
            if not isinstance(event, (RunStarted, StateChanged)):
                self._send(event, step)
        self.tracker.live_alerts = True
