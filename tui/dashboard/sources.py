"""Where a dashboard's events come from, and where its commands go: one source per run on screen.

- `LocalTrainer`: this process's own trainer, on a thread of its own (`moe-tui train` on a terminal).
- `RunFollower` (moe_core.live.follow): any run, through its folder and its control channel
  (`moe-tui watch`).

Both have the same face: `poll()` for new events, `command(verb)`, `sample(request)`, `probe(request)`,
`live`, `step`, `name`, `vocab`, and `generation`, which goes up when the run's history was rewritten
(a resume).
"""

from __future__ import annotations

import threading
from queue import Empty, SimpleQueue

from moe_core.bus import EventBus
from moe_core.config import Config
from moe_core.events import Event
from moe_core.model.request import SampleRequest
from moe_core.probe.request import ProbeRequest

__all__ = ["LocalTrainer", "reserve_torch_threads"]


class LocalTrainer:
    generation = 0  # this process rewrote the history before training started, never during

    def __init__(self, trainer, bus: EventBus | None = None, torch_threads: int | None = None):
        self.trainer, self.torch_threads = trainer, torch_threads
        self.name, self.vocab, self.run = trainer.run_folder.name, trainer.vocab, trainer.run_folder
        self.bus = bus or (trainer.on_event if isinstance(trainer.on_event, EventBus) else EventBus())
        trainer.on_event = self.bus
        self._events: SimpleQueue[Event] = SimpleQueue()
        self.queue_event = self._events.put
        self.bus.subscribe(self.queue_event)  # on the training thread: a queue put only
        self.thread = threading.Thread(target=self._train, name="trainer")
        self.crash: BaseException | None = None  # a bug in the loop (training failures are events)
        self.outcome: str | None = None

    def start(self) -> None:
        if not self.thread.is_alive() and self.outcome is None:
            self.thread.start()

    def _train(self) -> None:
        import torch  # here, not at the top: a viewer (`moe-tui watch`) draws without torch

        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        try:
            self.outcome = self.trainer.run(serve_after_finish=True)
        except BaseException as err:  # noqa: BLE001 - shown on the dashboard, not lost on a thread
            self.crash, self.outcome = err, "crashed"

    @property
    def live(self) -> bool:
        return self.thread.is_alive()

    @property
    def step(self) -> int:
        return self.trainer.step_num  # an int read: safe across threads

    def poll(self) -> list[Event]:
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except Empty:
                return events

    def command(self, verb: str) -> None:
        control = self.trainer.control
        {
            "pause": control.pause,
            "resume": control.resume,
            "save": control.save,
            "eval": control.evaluate,
            "stop": control.stop,
        }[verb]()

    def stop(self, reason: str) -> None:
        self.trainer.control.stop(reason)

    def sample(self, request: SampleRequest) -> None:
        self.trainer.control.sample(request)

    def probe(self, request: ProbeRequest) -> None:
        self.trainer.control.probe(request)

    def settings(self) -> Config:
        """The settings the trainer runs with now."""
        return self.trainer.config

    def change_settings(self, changes: dict) -> None:
        self.trainer.control.set(changes, "dashboard")


def reserve_torch_threads() -> int:
    """Leave the calling (UI) thread one torch thread; returns how many the trainer's thread should take.

    libgomp, the OpenMP runtime under torch's CPU kernels, keeps idle threads spinning between parallel
    regions only while it manages no more threads than there are CPUs; past that they sleep at once,
    and every small operator pays to wake them. Each thread that runs torch work gets its own team, so a
    UI thread that had used N threads, plus the trainer's N, slowed training by 15-20% on 2 cores. A
    team of one adds no threads. Call it before this thread runs any torch work (building the trainer
    included).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads
