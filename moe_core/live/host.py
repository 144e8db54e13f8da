"""What a training process runs beside the loop: its lease on the run, the control channel and the
heartbeat. Every front end (plain reporter, dashboard, detached) trains inside one of these.

    with LiveTraining(trainer, lease, bus):
        trainer.run()
"""

from __future__ import annotations

import socket
import threading

from moe_core.bus import EventBus
from moe_core.events import State, StateChanged
from moe_core.live.lease import RunLease
from moe_core.live.server import ControlServer
from moe_core.live.usage import UsageMonitor


class LiveTraining:
    def __init__(self, trainer, lease: RunLease, bus: EventBus):
        self.trainer, self.lease, self.bus = trainer, lease, bus
        trainer.on_event = bus
        self.server: ControlServer | None = None
        self.monitor = UsageMonitor(bus, lambda: trainer.step_num, trainer.device)
        self._closing, self._closed = threading.Lock(), False
        self.ended: State | None = None  # "finished" or "error", once training got there (a stop may follow)
        bus.subscribe(self._note_ending)

    def _note_ending(self, event) -> None:
        if isinstance(event, StateChanged) and event.state in (State.FINISHED, State.ERROR):
            self.ended = event.state
        elif isinstance(event, StateChanged) and event.state in (State.RUNNING, State.PAUSED):
            self.ended = None  # a finished run trains on (a longer max_iters)

    def __enter__(self) -> "LiveTraining":
        if hasattr(socket, "AF_UNIX"):
            try:
                self.server = ControlServer(
                    self.trainer.run_folder, self.trainer.control, self.trainer.vocab, lambda: self.trainer.step_num
                ).start()
                self.bus.subscribe(self.server)
            except OSError as err:  # no viewers then, but training is never refused for it
                self.server = None
                self.trainer.note(
                    "warning", f"no control channel ({err}); `moe-tui watch` can only follow this run's files"
                )
        self.monitor.start()
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is not None and not issubclass(exc_type, (SystemExit, KeyboardInterrupt)):
            self.ended = State.ERROR  # a crash of the process itself
        self.close()

    def close(self) -> None:
        """Stop serving and free the run, recording how training ended (safe to call twice, from any thread)."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
        self.monitor.stop()
        if self.server is not None:
            self.bus.unsubscribe(self.server)
            self.server.close()
        # A dashboard keeps a finished or failed run up until the user quits, which stops it: it ended there.
        state = self.ended or (
            self.trainer.state if self.trainer.state in (State.STOPPED, State.ERROR) else State.STOPPED
        )
        self.lease.release(state, self.trainer.step_num)
