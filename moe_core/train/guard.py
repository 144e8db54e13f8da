"""The guard: rules on the figures a run already reports, that pause (or stop, or flag) it before the
experts collapse and the compute is wasted.

It is a subscriber of the event bus on rank 0, like the reporter and the trackers: it reads each log
line's `StepMetrics` and `RouterStats` and each `EvalMetrics`, costs the training step nothing (no
extra device sync: the figures were already on the host), and asks the trainer, through its control
queue, to raise an `Alert`; the trainer logs the alert and acts on it between two steps, on every rank.

The rules, and why these defaults (all in the `[guard]` section of a config file):
- dead expert: an expert's share of its layer's tokens stays under `guard_dead_share` (0.1) of the
  fair share 1/E for `guard_windows` (5) log lines: one noisy window is normal early on, five are not.
- collapse: the entropy of a layer's load (its experts' shares) stays under `guard_entropy` (0.3) of
  its maximum ln E for as long: the tokens go to one or two experts, whichever they are.
- loss spike: a log line's loss above `guard_spike` (3x) its running mean: noise moves it by tens of
  per cent, divergence by multiples.
- non-finite loss: the trainer checks that itself at each log line, stops, and raises the alert.
- slow steps: the time per step above `guard_slow` (2x) the median so far for `guard_windows` log lines
  in a row: a thermal throttle, swap, a noisy neighbour (one slow line is noise). It only warns, whatever
  --on-alert says: the machine is slow, not the run.
- validation rising `guard_val_rises` (3) evaluations in a row: overfitting, or a learning rate too high.
Each rule trips once, until its figure is back to normal for `guard_windows` checks in a row.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from moe_core.config import Config
from moe_core.events import Alert, EvalMetrics, Event, RouterStats, RunStarted, SettingsChanged, StepMetrics
from moe_core.train.control import Control

WARMUP_WINDOWS = 5  # log lines before the loss and speed rules have a baseline


class Guard:
    def __init__(self, config: Config, control: Control, action: str):
        self.config, self.control, self.action = config, control, action
        self.tripped: set[str] = set()  # rules (per layer and expert) tripped and not yet back to normal
        self._calm: dict[str, int] = {}  # tripped rule -> checks in a row without its figure being bad
        self._low: dict[tuple[int, int], int] = {}  # (layer, expert) -> log lines in a row under the share
        self._flat: dict[int, int] = {}  # layer -> log lines in a row under the entropy
        self._losses: deque[float] = deque(maxlen=50)
        self._seconds: deque[float] = deque(maxlen=200)  # per step, per log line
        self._slow = 0  # log lines in a row slower than guard_slow times the median
        self._vals: list[float] = []
        self._step = 0

    def __call__(self, event: Event) -> None:
        if isinstance(event, (RunStarted, SettingsChanged)):  # a new baseline after a resume or a change
            self._losses.clear()
            self._seconds.clear()
            self._vals.clear()
        elif isinstance(event, StepMetrics):
            self._on_steps(event)
        elif isinstance(event, RouterStats):
            self._on_routing(event)
        elif isinstance(event, EvalMetrics):
            self._on_eval(event)

    def _on_steps(self, e: StepMetrics) -> None:
        self._step = e.step
        c = self.config
        if len(self._losses) >= WARMUP_WINDOWS:
            mean = sum(self._losses) / len(self._losses)
            self._check("loss_spike", e.loss > c.guard_spike * mean, e.step - c.log_interval,
                        f"loss {e.loss:.3f} at step {e.step} is {e.loss / mean:.1f}x its running mean {mean:.3f}")  # fmt: skip
        if math.isfinite(e.loss):
            self._losses.append(e.loss)
        if e.tokens_per_sec > 0:
            per_step = 1.0 / e.tokens_per_sec
            if len(self._seconds) >= WARMUP_WINDOWS:
                # Slow for guard_windows log lines in a row: one slow line is noise (a busy moment, a step
                # logged alone); a throttled or swapping machine stays slow.
                median = statistics.median(self._seconds)
                self._slow = self._slow + 1 if per_step > c.guard_slow * median else 0
                self._check("slow_step", self._slow >= c.guard_windows, e.step - self._slow * c.log_interval, "warn",
                            f"steps take {per_step / median:.1f}x their median time, for {self._slow} log lines "
                            f"(step {e.step})")  # fmt: skip
            self._seconds.append(per_step)

    def _on_routing(self, e: RouterStats) -> None:
        c = self.config
        for layer, routing in enumerate(e.layers):
            fair = 1.0 / len(routing.expert_fraction)
            for expert, share in enumerate(routing.expert_fraction):
                key = (layer, expert)
                self._low[key] = self._low.get(key, 0) + 1 if share < c.guard_dead_share * fair else 0
                self._check(f"dead_expert/{layer}/{expert}", self._low[key] >= c.guard_windows, self._since(e, self._low[key]),
                            f"expert {expert} of layer {layer} has taken under {c.guard_dead_share:.0%} of its fair "
                            f"share for {self._low[key]} log lines (now {share:.1%}, fair {fair:.1%})")  # fmt: skip
            # The entropy of the load (how the tokens spread over the experts), not of each token's choice:
            # a confident router that still uses every expert is healthy.
            ceiling = math.log(len(routing.expert_fraction))
            load = -sum(f * math.log(f) for f in routing.expert_fraction if f > 0)
            flat = ceiling > 0 and load < c.guard_entropy * ceiling
            self._flat[layer] = self._flat.get(layer, 0) + 1 if flat else 0
            self._check(f"collapse/{layer}", self._flat[layer] >= c.guard_windows, self._since(e, self._flat[layer]),
                        f"layer {layer}'s router has collapsed onto few experts: its load's entropy {load:.2f} "
                        f"nats, under {c.guard_entropy:.0%} of ln E = {ceiling:.2f}, for {self._flat[layer]} log lines")  # fmt: skip

    def _on_eval(self, e: EvalMetrics) -> None:
        self._vals.append(e.val_loss)
        n = self.config.guard_val_rises
        rising = len(self._vals) > n and all(a < b for a, b in zip(self._vals[-n - 1 : -1], self._vals[-n:]))
        self._check("val_rising", rising, e.step - n * self.config.eval_interval,
                    f"validation loss rose {n} evaluations in a row, to {e.val_loss:.4f} at step {e.step}")  # fmt: skip

    def _since(self, e: RouterStats, windows: int) -> int:
        """The step where a streak of `windows` log lines began."""
        return e.step - windows * self.config.log_interval

    def _check(self, rule: str, bad: bool, since: int, *said: str) -> None:
        """Trip `rule` if `bad` and not tripped already; said: the message, or an action and the message
        (slow steps only warn: the machine is the problem, not the run). A tripped rule is back to normal
        after `guard_windows` checks in a row without `bad`: a figure that hovers about its threshold (step
        times on a busy machine, logged every step) would otherwise alert at every other log line."""
        action, message = said if len(said) == 2 else (self.action, said[0])
        if bad:
            self._calm.pop(rule, None)
            if rule not in self.tripped:
                self._trip(rule, message, action if self.action != "warn" else "warn", since)
        elif rule in self.tripped:
            self._calm[rule] = self._calm.get(rule, 0) + 1
            if self._calm[rule] >= self.config.guard_windows:
                self.tripped.discard(rule)
                del self._calm[rule]

    def _trip(self, rule: str, message: str, action: str, since: int | None = None) -> None:
        self.tripped.add(rule)
        step = self._step
        self.control.alert(Alert(step, rule.split("/")[0], message, action, step if since is None else max(0, since)))
