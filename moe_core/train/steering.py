"""Steering and probing a training loop from outside: settings changed between two steps, the guard's
alerts, and probes of the weights as they are.

A part of `Trainer` (moe_core/train/trainer.py), kept apart from the loop: the loop hands a `set`
command to `_serve_settings`, an `alert` command to `_raise_alert`, a `sample` to `_sample` and a `probe`
to `_probe`, between two steps, on every rank.
"""

from __future__ import annotations

from moe_core.errors import UserError
from moe_core.events import Alert, Notice, Sample, SettingsChanged, State
from moe_core.model.request import SampleRequest
from moe_core.probe.ablate import EvalSet
from moe_core.probe.answer import answer
from moe_core.probe.request import ProbeRequest, refusal
from moe_core.probe.trace import first_experts
from moe_core.train import checkpointing, settings


class Steering:
    """The trainer's answers to `moe-tui set` (and the dashboard's `o`), to the guard, to samples and probes."""

    def _probe(self, request: ProbeRequest) -> None:
        """Route a text, switch experts off, rank them: on the weights as they are now, on rank 0 (which
        gathers every expert first under expert parallelism); the answer is a `Probed` event."""
        self.set_state(State.EVALUATING)
        if self.expert_parallel:
            with self.expert_parallel.whole_model() as here:
                if here:
                    self._answer_probe(request)
        elif self.ranks.leader:
            self._answer_probe(request)

    def _answer_probe(self, request: ProbeRequest) -> None:
        evals = EvalSet(self.val_ids, self.config, self.device)
        try:
            with self.autocast:
                self.emit(answer(self.model, self.vocab, evals, request, self.step_num, "live"))
        except UserError as err:  # said with the asker's id, so that its screen knows the answer
            self.emit(Notice("warning", refusal(request, err), self.step_num))

    def _raise_alert(self, alert: Alert) -> State | None:
        """Log the guard's alert, then warn, pause or stop as it asks (a stop saves first, as any stop)."""
        self.emit(alert)
        if alert.action == "warn" or self.state == State.ERROR or self._done:
            return None
        self._report_writes(wait=True)
        if self.ranks.leader:
            try:
                kept = checkpointing.keep_last_good(self.run_folder, alert.since)
            except OSError as err:  # a full disk, say: the alert still acts
                kept = None
                self.emit(Notice("warning", f"could not keep checkpoints/last-good ({err})", self.step_num))
            if kept is not None:
                self.emit(
                    Notice("info", f"kept {kept.name} as checkpoints/last-good: from before the alert", self.step_num)
                )
        if alert.action == "stop":
            self.guard_stopped = True
            self._checkpoint_quietly()
            self.set_state(State.STOPPED, f"guard: {alert.message}")
            return State.STOPPED
        self._paused = True
        self.set_state(State.PAUSED, f"guard: {alert.message}")
        return None

    def _serve_settings(self, changes: dict, source: str) -> None:
        """A `set` command: refused after a failure, or with a value `train` would refuse (a warning);
        a longer `max_iters` sets a finished run training again."""
        if self.state == State.ERROR:
            self.emit(
                Notice(
                    "warning",
                    "settings not changed: training failed; resume from the last checkpoint "
                    "with the new settings instead",
                    self.step_num,
                )
            )
            return
        try:
            self._change_settings(changes, source)
        except UserError as err:
            self.emit(Notice("warning", f"settings not changed: {err}", self.step_num))
            return
        if self._done and self.state == State.FINISHED and self.step_num < self.config.max_iters:
            self._done = False
            self.set_state(State.PAUSED if self._paused else State.RUNNING)

    def _change_settings(self, changes: dict, source: str) -> None:
        """Take new settings between two steps: every rank alike, each change an event, and the run's
        config.toml the current values, so that a resume goes on with them."""
        changes = settings.checked_changes(self.config, changes)
        self.pending_settings = [p for p in self.pending_settings if p.key not in changes]  # the user's now
        old = self.apply_settings(changes)
        for key, new in changes.items():
            self.emit(SettingsChanged(self.step_num, key, old[key], new, source))
        if self.ranks.leader and changes:
            try:
                self.run_folder.save_config(self.config)
            except OSError as err:
                self.emit(
                    Notice(
                        "warning",
                        f"could not write {self.run_folder.config_path.name} ({err}): a resume "
                        "would start with the settings before this change",
                        self.step_num,
                    )
                )

    def _sample(self, arg: object) -> None:
        self.set_state(State.SAMPLING)
        request = (
            arg
            if isinstance(arg, SampleRequest)
            else SampleRequest(prompt=self.vocab.default_prompt(), max_new_tokens=self.config.sample_tokens)
        )
        text = self.sample(request)
        self.run_folder.append_sample(self.step_num, text)
        experts = first_experts(self.model, self.vocab, text)
        self.emit(
            Sample(self.step_num, request.prompt, text, isinstance(arg, SampleRequest), request.temperature, experts)
        )
