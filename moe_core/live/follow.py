"""One run as a viewer sees it: the history in its folder, then whatever follows, live or finished.

    follower = RunFollower(run, resume_hint="moe-tui train --resume NAME")
    events = follower.poll()      # a few times a second: new events since the last call

Logged events come from `metrics.jsonl`, read incrementally, so the picture is the same whoever
started the run and however; state changes and the heartbeat come over the control channel while a
trainer is live. Without one, the run's lease says how it ended (finished, stopped, crashed), and
sampling loads the latest checkpoint here.
"""

from __future__ import annotations

import os
import queue
import threading
import time

from moe_core.config import Config
from moe_core.errors import UserError
from moe_core.events import Event, Notice, ResourceUsage, Sample, State, StateChanged, from_line, from_record
from moe_core.hints import resume_command
from moe_core.live.client import ControlClient, TrainerGone, live_client
from moe_core.live.lease import read_status
from moe_core.live.protocol import probe_arguments, sample_arguments
from moe_core.model.request import SampleRequest
from moe_core.probe.request import ProbeRequest, refusal
from moe_core.store.runs import Run

RECONNECT_SECONDS = 1.0  # without a live trainer: how often to look for one (a resumed run, say)
HEARTBEAT_SECONDS = 5.0  # a live trainer says something every second; this long silent is worth a word
RECONNECT_WAIT_SECONDS = 0.3  # polled from the UI thread: a trainer that cannot answer (stopped) is retried later


class RunFollower:
    def __init__(self, run: Run, resume_hint: str = ""):
        self.run, self.name = run, run.name
        self.vocab = run.load_vocab()
        self.resume_hint = resume_hint or resume_command(run.name, run.path.parent)
        self.client: ControlClient | None = None
        self.generation = 0  # goes up when metrics.jsonl was rewritten (a resume): start the picture afresh
        self.last_step = 0
        self._offset, self._file_id = 0, None
        self._next_look = 0.0
        self._last_heard = 0.0
        self._silence_reported = False
        self._status_shown: tuple | None = None
        self._local: queue.SimpleQueue[Event] = queue.SimpleQueue()  # made here: greetings, samples drawn here
        self._probe_lock = threading.Lock()
        self._probed_model = None  # (checkpoint folder, SavedModel): what a probe here read last

    @property
    def live(self) -> bool:
        return self.client is not None

    @property
    def step(self) -> int:
        return self.last_step

    def attach(self) -> None:
        """Connect now if a trainer is live; UserError for a socket that is not this user's, or a
        trainer speaking another protocol (bad input, reported before any screen opens)."""
        if self.client is None:
            self._connected(live_client(self.run))
            self._next_look = time.monotonic() + RECONNECT_SECONDS

    def _connected(self, client: ControlClient | None) -> None:
        """Take a new connection (or none): its greeting becomes the state and step shown next."""
        self.client = client
        if client is None:
            return
        self._last_heard, self._silence_reported, self._status_shown = time.monotonic(), False, None
        hello = client.hello
        self._local.put(StateChanged(_known_state(hello.get("state")), f"attached to process {hello.get('pid')}"))
        self._local.put(ResourceUsage(int(hello.get("step", 0)), 0.0, 0))

    # -- events in -----------------------------------------------------------------------------

    def poll(self) -> list[Event]:
        events = self._read_log()
        events += self._read_channel()
        while True:
            try:
                events.append(self._local.get_nowait())
            except queue.Empty:
                break
        for event in events:
            self.last_step = max(self.last_step, getattr(event, "step", 0) or 0)
        return events

    def _read_log(self) -> list[Event]:
        path = self.run.metrics_path
        try:
            with open(path, "rb") as f:
                stat = os.fstat(f.fileno())
                file_id = (stat.st_dev, stat.st_ino)
                if file_id != self._file_id or stat.st_size < self._offset:  # replaced by a resume's rewind
                    if self._file_id is not None:
                        self.generation += 1
                        self.last_step = 0
                    self._file_id, self._offset = file_id, 0
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        whole = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self._offset += len(whole)
        return [event for line in whole.splitlines() if (event := from_line(line)) is not None]

    def _read_channel(self) -> list[Event]:
        now = time.monotonic()
        if self.client is None:
            if now < self._next_look:
                return []
            self._next_look = now + RECONNECT_SECONDS
            try:
                self._connected(live_client(self.run, timeout=RECONNECT_WAIT_SECONDS))
            except UserError as err:
                self._next_look = float("inf")  # another user's socket, another protocol: say it once
                return [Notice("error", str(err), self.last_step)]
            return [] if self.client is not None else self._ended_state()  # a greeting is queued
        try:
            messages = self.client.receive()
        except TrainerGone:
            self.client.close()
            self.client = None
            self._next_look = now + RECONNECT_SECONDS
            return self._ended_state()
        events = []
        for message in messages:
            self._last_heard = now
            self._silence_reported = False
            if message.get("type") == "event":
                try:
                    events.append(from_record(message["event"]))
                except (KeyError, TypeError, ValueError):  # of a kind or state this version does not know
                    continue
            elif message.get("type") == "reply" and not message.get("ok"):
                events.append(
                    Notice("warning", f"the trainer refused a command: {message.get('error')}", self.last_step)
                )
        if now - self._last_heard > HEARTBEAT_SECONDS and not self._silence_reported:
            self._silence_reported = True
            events.append(
                Notice(
                    "warning",
                    f"no word from process {self.client.hello.get('pid')} for "
                    f"{HEARTBEAT_SECONDS:.0f} s: stopped (Ctrl-Z, SIGSTOP) or swapping?",
                    self.last_step,
                )
            )
        return events

    def _ended_state(self) -> list[Event]:
        """How the last process ended, as a state change, once per change of that answer."""
        status = read_status(self.run)
        key = (status.state, status.pid, status.step)
        if key == self._status_shown or status.state == "live":
            return []
        self._status_shown = key
        if status.state == "crashed":
            return [
                StateChanged(
                    State.GONE, f"process {status.pid} gone at step {self.last_step}; resume with: {self.resume_hint}"
                )
            ]
        if status.state == "unknown":  # a run recorded before leases: its files say as much as can be said
            return [StateChanged(State.FINISHED if self._finished() else State.STOPPED, "no live trainer")]
        return [StateChanged(status.state, "no live trainer")]

    def _finished(self) -> bool:
        try:
            return self.last_step >= self.run.load_config().max_iters
        except (UserError, OSError, TypeError):
            return False

    # -- commands out ----------------------------------------------------------------------------

    def command(self, verb: str) -> None:
        """pause, resume, save, eval or stop, sent to the live trainer."""
        if self.client is None:
            self._local.put(Notice("warning", f"{verb}: no live trainer for run {self.name}", self.last_step))
            return
        try:
            self.client.send(verb)
        except TrainerGone:
            pass  # the next poll finds the connection closed and says so

    def settings(self) -> Config:
        """The run's settings now: its config.toml, which a live trainer rewrites at each change."""
        return self.run.load_config()

    def change_settings(self, changes: dict) -> None:
        """Sent to the live trainer, which checks them again and logs what it took (or why not)."""
        if self.client is None:
            self._local.put(Notice("warning", f"settings: no live trainer for run {self.name}", self.last_step))
            return
        try:
            self.client.send("set", changes=changes, source="viewer")
        except TrainerGone:
            pass  # the next poll finds the connection closed and says so

    def sample(self, request: SampleRequest) -> None:
        """By the live trainer when there is one, else here from the latest checkpoint."""
        if self.client is not None:
            try:
                self.client.send("sample", **sample_arguments(request))
                return
            except TrainerGone:
                pass
        threading.Thread(target=self._sample_here, args=(request,), name="sample", daemon=True).start()

    def _sample_here(self, request: SampleRequest) -> None:
        from moe_core.model.sampling import complete, load_model
        from moe_core.probe.trace import first_experts

        try:
            model, vocab, step = load_model(self.run, "latest", "cpu")
            text = complete(model, vocab, request, default_seed=step)[0]
            experts = first_experts(model, vocab, text)
            self._local.put(Sample(step, request.prompt, text, True, request.temperature, experts))
        except (UserError, RuntimeError, OSError) as err:
            self._local.put(Notice("warning", f"sampling here failed: {str(err).splitlines()[0]}", self.last_step))

    def probe(self, request: ProbeRequest) -> None:
        """By the live trainer, on its weights as they are; else here, from the run's latest checkpoint."""
        if self.client is not None:
            try:
                self.client.send("probe", **probe_arguments(request))
                return
            except TrainerGone:
                pass
        threading.Thread(target=self._probe_here, args=(request,), name="probe", daemon=True).start()

    def _probe_here(self, request: ProbeRequest) -> None:
        from moe_core.data.corpus import default_data_dir
        from moe_core.probe.source import SavedModel

        with self._probe_lock:  # one at a time, the checkpoint loaded once for all of them
            try:
                folder = self.run.checkpoint("latest")
                if self._probed_model is None or self._probed_model[0] != folder:
                    self._probed_model = folder, SavedModel.load(self.run, "latest", default_data_dir())
                self._local.put(self._probed_model[1].probe(request))
            except Exception as err:  # noqa: BLE001 - on a thread of its own: said, never lost
                why = str(err).splitlines()[0] if str(err) else type(err).__name__
                self._local.put(Notice("warning", refusal(request, f"{why} (probed here)"), self.last_step))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def _known_state(value) -> State:
    """A trainer's state from its greeting; one this version does not know (a newer trainer's) reads as running."""
    try:
        return State(value)
    except ValueError:
        return State.RUNNING
