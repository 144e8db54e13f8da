"""What the dashboard knows about the run, folded from trainer events (never read back from widgets).

The UI thread applies queued events here a few times a second; each panel redraws only when the part
of the state it shows has changed (`changed` holds the names of those parts until the UI clears it).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from moe_core.events import (
    Alert,
    CheckpointSaved,
    EvalMetrics,
    Event,
    ExpertChars,
    Notice,
    Probed,
    ResourceUsage,
    RouterStats,
    RunStarted,
    Sample,
    SettingsChanged,
    State,
    StateChanged,
    StepMetrics,
)
from moe_core.probe.request import ProbeRequest, refusal
from tui.dashboard.history import SeriesBuffer

SAMPLES_KEPT = 20
LOG_LINES_KEPT = 200
EXPERT_HISTORY = 64  # evaluations kept for the experts screen's look back: evenly spaced, the first kept
ANSWERS_KEPT = 16  # probe answers kept, by request id, for the screens that asked
SMOOTHING = 0.8  # EMA weight of the past for the plotted train loss (each point is already a window mean)

# Parts of the state, one per panel; `changed` collects these names.
STATUS, CHART, EXPERTS, SAMPLES, LOG = "status", "chart", "experts", "samples", "log"


@dataclass(frozen=True)
class LogLine:
    level: str  # "info" | "eval" | "checkpoint" | "setting" | "warning" | "error"
    step: int
    text: str


class RunView:
    def __init__(self) -> None:
        self.run: RunStarted | None = None
        self.state: State = State.STARTING
        self.state_message = ""
        self.step = 0
        self.metrics: StepMetrics | None = None
        self.elapsed = 0.0
        self.last_eval: EvalMetrics | None = None
        self.best_val = math.inf
        self.routing: RouterStats | None = None
        self.error: str | None = None
        self.alert: Alert | None = None  # the guard's last alert, shown while the run is held by it
        self.alerts_seen = 0  # for the front ends' bell: one ring per new alert
        self.pending: str | None = None  # a command sent but not yet answered, e.g. "pausing"
        self.train_loss = SeriesBuffer()  # smoothed, per log interval
        self.eval_train = SeriesBuffer(1024)
        self.eval_val = SeriesBuffer(1024)
        self.eval_val_time = SeriesBuffer(1024)  # the same points against training seconds
        self.usage: ResourceUsage | None = None
        self.expert_chars: ExpertChars | None = None  # which characters each expert took, latest evaluation
        self.previous_expert_chars: ExpertChars | None = None
        self.expert_history: list[ExpertChars] = []  # one evaluation in every `_history_stride`
        self._history_stride, self._evaluations = 1, 0
        self.answers: dict[int, Probed] = {}  # probe answers by request id, the latest ANSWERS_KEPT
        self.measured: Probed | None = None  # the latest answer with importance or similarity
        self.sample_layer: int | None = None  # the samples coloured by the experts of this layer (k); None: plain
        self.gone: str | None = None  # the trainer died: what to do about it
        self._ema: float | None = None
        self._ema_weight = 0.0  # for the bias correction of the EMA's first points
        self.samples: deque[Sample] = deque(maxlen=SAMPLES_KEPT)
        self.log: deque[LogLine] = deque(maxlen=LOG_LINES_KEPT)
        self.settings_steps: deque[int] = deque(maxlen=LOG_LINES_KEPT)  # where the loss chart marks a change
        self.changed: set[str] = {STATUS, CHART, EXPERTS, SAMPLES, LOG}

    # -- derived figures -----------------------------------------------------------------------

    @property
    def max_iters(self) -> int:
        return self.run.max_iters if self.run else 0

    @property
    def eta_seconds(self) -> float | None:
        """Remaining steps at the run's mean pace so far (evals and samples included)."""
        if self.step <= 0 or self.elapsed <= 0 or self.state.ended:
            return None
        return max(0, self.max_iters - self.step) * self.elapsed / self.step

    @property
    def banner(self) -> str:
        """The line shown above the panels, if any: an error, or a trainer that is gone."""
        if self.error is not None:
            return f"✗ {self.error}"
        if self.gone:
            return f"✗ {self.gone}"
        if self.alert is not None and self.state_message.startswith("guard:"):  # held by the guard now
            if self.state == State.PAUSED:
                return f"! guard: {self.alert.message} (paused: fix with o, fork with f, or resume with space)"
            return f"! guard: {self.alert.message} (stopped: fork it, or resume it with new settings)"
        return ""

    @property
    def smoothed_loss(self) -> float | None:
        return self._ema / self._ema_weight if self._ema is not None else None

    # -- folding events in ---------------------------------------------------------------------

    def apply(self, event: Event) -> None:
        handler = getattr(self, f"_on_{type(event).__name__}", None)
        if handler is not None:
            handler(event)

    def _on_RunStarted(self, e: RunStarted) -> None:
        self.run = e
        self.step = e.start_step
        verb = f"resumed at step {e.start_step}" if e.resumed else "started"
        self.note("info", f"run {e.run_name} {verb} on {e.device}")
        self.changed |= {STATUS, CHART}

    def _on_SettingsChanged(self, e: SettingsChanged) -> None:
        self.settings_steps.append(e.step)
        self.note("setting", f"{e.key} {e.old:g} → {e.new:g} ({e.source})", e.step)
        self.changed.add(CHART)

    def observe_step(self, step: int) -> None:
        """The trainer's own step counter, read between events: StepMetrics come every log interval."""
        if step > self.step:
            self.step = step
            self.changed.add(STATUS)

    def _on_StepMetrics(self, e: StepMetrics) -> None:
        self.metrics, self.step, self.elapsed = e, max(self.step, e.step), e.elapsed
        if math.isfinite(e.loss):
            self._ema = e.loss * (1 - SMOOTHING) + (self._ema or 0.0) * SMOOTHING
            self._ema_weight = (1 - SMOOTHING) + self._ema_weight * SMOOTHING
            self.train_loss.append(e.step, self.smoothed_loss)
        self.changed |= {STATUS, CHART}

    def _on_EvalMetrics(self, e: EvalMetrics) -> None:
        best = e.val_loss < self.best_val
        self.best_val = min(self.best_val, e.val_loss)
        self.last_eval, self.step = e, max(self.step, e.step)
        self.eval_train.append(e.step, e.train_loss)
        self.eval_val.append(e.step, e.val_loss)
        self.eval_val_time.append(e.elapsed, e.val_loss)
        self.note(
            "eval",
            f"eval train {e.train_loss:.3f} val {e.val_loss:.3f} ({e.val_bpc:.2f} bpc){' best' if best else ''}",
            e.step,
        )
        self.changed |= {STATUS, CHART}

    def _on_RouterStats(self, e: RouterStats) -> None:
        self.routing = e
        self.changed.add(EXPERTS)

    def _on_ExpertChars(self, e: ExpertChars) -> None:
        self.previous_expert_chars, self.expert_chars = self.expert_chars, e
        if self._evaluations % self._history_stride == 0:
            self.expert_history.append(e)
        self._evaluations += 1
        if len(self.expert_history) > EXPERT_HISTORY:  # every other one goes, and so on: evenly spaced
            self.expert_history = self.expert_history[::2]
            self._history_stride *= 2
        self.changed.add(EXPERTS)

    def _on_Probed(self, e: Probed) -> None:
        self.answers[e.request_id] = e
        if len(self.answers) > ANSWERS_KEPT:
            del self.answers[next(iter(self.answers))]
        if e.importance is not None or e.similarity is not None:
            self.measured = e

    def _on_Sample(self, e: Sample) -> None:
        self.samples.appendleft(e)
        self.changed.add(SAMPLES)

    def _on_CheckpointSaved(self, e: CheckpointSaved) -> None:
        name = e.path.replace("\\", "/").rsplit("/", 1)[-1]
        self.note("checkpoint", f"saved {name}", e.step)

    def _on_ResourceUsage(self, e: ResourceUsage) -> None:
        self.usage = e if e.rss_bytes else self.usage  # a viewer's first greeting carries the step only
        self.observe_step(e.step)
        self.changed.add(STATUS)

    def _on_StateChanged(self, e: StateChanged) -> None:
        self.state, self.state_message = e.state, e.message
        self.gone = e.message if e.state == State.GONE else None
        if e.state == State.GONE:
            self.note("error", e.message, self.step)
        if e.state.ended:
            self.usage = None  # no process to measure
        if e.state not in (State.SAMPLING, State.SAVING, State.EVALUATING):  # those pass; the answer is the state after
            self.pending = None
        if e.state == State.ERROR:
            self.error = e.message or "training failed"
        if e.state in (State.FINISHED, State.STOPPED):
            self.note("info", f"{e.state}{': ' + e.message if e.message else ''}", self.step)
        self.changed.add(STATUS)

    def _on_Alert(self, e: Alert) -> None:
        self.alert = e
        self.alerts_seen += 1
        self.note("warning", f"guard ({e.rule}, {e.action}): {e.message}", e.step)
        self.changed.add(STATUS)

    def _on_Notice(self, e: Notice) -> None:
        if e.level == "error":
            self.error = e.message  # the full message, with the hint about the kept checkpoint
            self.changed.add(STATUS)
        self.note(e.level, e.message, e.step)

    def request(self, pending: str) -> None:
        """Show at once that a command was sent; the trainer's next state change clears it."""
        self.pending = pending
        self.changed.add(STATUS)

    def probe_refused(self, request_id: int) -> str | None:
        """Why probe `request_id` got no answer, where it was refused (its warning names it)."""
        said = refusal(ProbeRequest(request_id=request_id), "")
        return next((line.text[len(said) :] for line in self.log if line.text.startswith(said)), None)

    def note(self, level: str, text: str, step: int | None = None) -> None:
        self.log.appendleft(LogLine(level, self.step if step is None else step, text))
        self.changed.add(LOG)
