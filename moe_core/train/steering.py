"""Steering a training loop from outside: settings changed between two steps, and the guard's alerts.

A part of `Trainer` (moe_core/train/trainer.py), kept apart from the loop: the loop hands a `set`
command to `_serve_settings` and an `alert` command to `_raise_alert`, between two steps, on every rank.
"""

from __future__ import annotations

from moe_core.errors import UserError
from moe_core.events import Alert, Notice, SettingsChanged, State
from moe_core.train import checkpointing, settings


class Steering:
    """The trainer's answers to `moe-tui set` (and the dashboard's `o`) and to the guard."""

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
