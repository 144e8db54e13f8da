"""The plain front end: one line per log interval and per evaluation, for nohup, CI and pipes.

On a terminal it adds a Rich progress bar under the lines; elsewhere it prints plain text only.
"""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from moe_core.events import (
    Alert,
    CheckpointSaved,
    EvalMetrics,
    Event,
    Notice,
    RouterStats,
    RunStarted,
    Sample,
    SettingsChanged,
    State,
    StateChanged,
    StepMetrics,
)
from moe_core.signals import HANGUP, outcome_exit_code, signal_reason, stop_signals_handled
from tui.exits import move_output_after_hangup, print_next_step
from tui.notify import notification


def format_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


class HeadlessReporter:
    def __init__(self, stream: TextIO | None = None, progress: bool | None = None):
        stream = stream or sys.stdout
        self.console = Console(file=stream, highlight=False, soft_wrap=True)
        self.use_bar = self.console.is_terminal if progress is None else progress
        self.progress: Progress | None = None
        self.task = None
        self.best_val = float("inf")
        self.pending_step: StepMetrics | None = None

    def __call__(self, event: Event) -> None:
        line = self.describe(event)
        if line:
            self.console.print(line, markup=False)
        if self.progress is not None and isinstance(event, RouterStats):
            self.progress.update(self.task, completed=event.step)

    def describe(self, event: Event) -> str | None:
        if isinstance(event, RunStarted):
            verb = f"resuming at step {event.start_step}" if event.resumed else "training"
            self._start_bar(event)
            return (
                f"{verb} run '{event.run_name}' on {event.dataset} | device {event.device} | "
                f"{format_params(event.params_total)} params, {format_params(event.params_active)} active "
                f"per token | vocab {event.vocab_size} | {event.max_iters} steps of {event.tokens_per_step} tokens"
            )
        if isinstance(event, StepMetrics):  # printed with the routing figures that follow it
            self.pending_step = event
            return None
        if isinstance(event, RouterStats) and self.pending_step is not None:
            step, self.pending_step = self.pending_step, None
            layers = event.layers
            balance = sum(layer.imbalance for layer in layers) / len(layers)
            dropped = sum(layer.dropped_fraction for layer in layers) / len(layers)
            return (
                f"step {step.step:>6} | loss {step.loss:.4f} | aux {step.aux_loss:.3f} z {step.z_loss:.3f} "
                f"| experts cv {balance:.2f} drop {dropped:.1%} | lr {step.lr:.2e} "
                f"| {step.tokens_per_sec:,.0f} tok/s | {step.elapsed:.0f}s"
            )
        if isinstance(event, EvalMetrics):
            mark = " *best*" if event.val_loss < self.best_val else ""
            self.best_val = min(self.best_val, event.val_loss)
            return (
                f"eval {event.step:>6} | train {event.train_loss:.4f} | val {event.val_loss:.4f} nats/char "
                f"({event.val_bpc:.3f} bits/char){mark}"
            )
        if isinstance(event, Sample):
            body = event.text.replace("\n", "\n    ")
            return f"sample @ step {event.step}:\n    {body}"
        if isinstance(event, CheckpointSaved):
            return f"saved {'best ' if event.best else ''}checkpoint at step {event.step} -> {event.path}"
        if isinstance(event, SettingsChanged):
            return f"setting {event.key} {event.old} -> {event.new} at step {event.step} ({event.source})"
        if isinstance(event, Alert):
            if self.console.is_terminal:
                self.console.file.write(notification("moe-tui", event.message))
            return f"alert ({event.rule}): {event.message}; the run {event.action}s"
        if isinstance(event, Notice):
            return f"{event.level}: {event.message}"
        if isinstance(event, StateChanged) and event.state in (State.FINISHED, State.STOPPED):
            self._stop_bar()
            return f"{event.state}{': ' + event.message if event.message else ''}"
        if isinstance(event, StateChanged) and event.state == State.ERROR:
            self._stop_bar()
        return None

    def _start_bar(self, event: RunStarted) -> None:
        if not self.use_bar or self.progress is not None:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.task = self.progress.add_task(event.run_name, total=event.max_iters, completed=event.start_step)
        self.progress.start()

    def _stop_bar(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def close(self) -> None:
        self._stop_bar()


def run_headless(running, on_hangup: str) -> int:
    """Train with plain log lines until the run ends; the exit code. Ctrl-C, SIGTERM and (with
    `on_hangup` "stop") SIGHUP save a checkpoint and stop; a second Ctrl-C means it."""
    trainer = running.trainer
    reporter = HeadlessReporter()
    running.bus.subscribe(reporter)
    received: list[int] = []

    def on_signal(signum, frame):
        if signum == HANGUP and on_hangup == "keep":
            move_output_after_hangup(trainer.run_folder)  # the terminal is gone; training goes on
            return
        if received and trainer.ranks.parallel:  # torchrun passing on the signal this process had already
            return
        if received:  # a second Ctrl-C: the user means it
            raise KeyboardInterrupt
        received.append(signum)
        trainer.control.stop(signal_reason(signum))

    with stop_signals_handled(on_signal):
        try:
            outcome = trainer.run()
        finally:
            reporter.close()
    print_next_step(trainer, running.resume_hint, running.sample_hint)
    running.tracking.close()  # while the reporter still prints its warnings
    # A stop by a signal, or on request from a viewer or `moe-tui stop`; unsaved: the final save failed.
    return outcome_exit_code(outcome, trainer.unsaved, received[0] if received else None, trainer.guard_stopped)
