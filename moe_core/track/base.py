"""What every tracker backend shares: the `Tracker` a backend subclasses, and the events turned into its
scalars and text (`send`).

A backend implements `open`, `scalars`, `text`, `close` and `describe`; it never sees the bus, the
queue or the thread: `TrackerSink` (moe_core/track/sink.py) runs it.
"""

from __future__ import annotations

import math
from typing import Any

from moe_core.config import Config
from moe_core.events import Alert, EvalMetrics, Event, RouterStats, RunStarted, Sample, SettingsChanged, StepMetrics
from moe_core.store.runs import Run

TEXTS_APART = "\n\n" + "-" * 40 + "\n\n"  # between texts sent together (`Tracker.add_text`)


class Tracker:
    """One tracking backend. Its methods run on the sink's worker thread, one at a time."""

    name = ""  # the value of --track
    package = ""  # the module it needs; missing, `pip install 'moe-tui[EXTRA]'` is the fix
    extra = ""  # the pip extra that installs it (default: the name)
    # True: `open` itself drops what the tracked run holds after `start_step` (TensorBoard's purge).
    # False: events at steps the tracked run already has are skipped, so no step is logged twice.
    rewinds = False
    # True: a second text under one key at one step replaces the first (a W&B history row, an MLflow
    # artifact path). Then `add_text` sends all of that step's texts so far, joined, and none is lost:
    # several samples asked for while paused all come at the same step.
    one_text_per_step = False

    def __init__(self, run: Run, project: str, entry: dict[str, Any]):
        self.run = run
        self.entry = entry  # this tracker's part of trackers.json: ids to continue with, where it wrote
        # A tracked run stays in the project it started in (a tracker that has projects saves it as "project").
        self.project = entry.get("project", project)
        self._texts: dict[str, tuple[int, list[str]]] = {}  # per key: the last step's texts

    def open(self, params: dict[str, Any], start_step: int, continuing: bool) -> None:
        """Start (or, `continuing`, reopen) the tracked run and record its hyperparameters; may fill
        `self.entry` with what a resume or `moe-tui runs show` needs."""
        raise NotImplementedError

    def scalars(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def expert_shares(self, step: int, layer: int, shares: list[float]) -> None:
        """Each expert's share of one layer's routed tokens: one scalar per expert unless overridden."""
        self.scalars(step, {f"experts/layer{layer}/expert{i}": share for i, share in enumerate(shares)})

    def text(self, step: int, key: str, text: str) -> None:
        raise NotImplementedError

    def add_text(self, step: int, key: str, text: str) -> None:
        if self.one_text_per_step:
            last = self._texts.get(key)
            texts = [*last[1], text] if last is not None and last[0] == step else [text]
            self._texts[key] = (step, texts)
            text = TEXTS_APART.join(texts)
        self.text(step, key, text)

    live_alerts = True  # False while past events are sent again (export, a resume's backfill)

    def alert(self, step: int, title: str, text: str) -> None:
        """A guard alert: as text under "alerts" unless the backend has alerts of its own (W&B)."""
        self.add_text(step, "alerts", f"{title}: {text}")

    def close(self, outcome: str) -> None:
        """End the tracked run: outcome is finished, stopped or error."""
        raise NotImplementedError

    @classmethod
    def describe(cls, run: Run, entry: dict[str, Any]) -> str:
        """Where this tracker wrote the run, and how to open it (for `moe-tui runs show`)."""
        raise NotImplementedError

    @classmethod
    def extra_name(cls) -> str:
        return cls.extra or cls.name


def run_params(config: Config, started: RunStarted | None) -> dict[str, Any]:
    """The hyperparameters every tracker records: the resolved config and the model's size."""
    params: dict[str, Any] = {k: (", ".join(v) if isinstance(v, list) else v) for k, v in config.to_dict().items()}
    if started is not None:
        params.update(
            params_total=started.params_total,
            params_active=started.params_active,
            tokens_per_step=started.tokens_per_step,
            vocab_size=started.vocab_size,
            resolved_device=started.device,
        )
    return params


SENT = (
    StepMetrics,
    EvalMetrics,
    RouterStats,
    Sample,
    SettingsChanged,
    Alert,
)  # what `send` turns into scalars and text


def send(tracker: Tracker, event: Event) -> None:
    """What the dashboard shows of one event, as the tracker's scalars and text."""
    if isinstance(event, StepMetrics):
        tracker.scalars(
            event.step,
            {
                "train/loss": event.loss,
                "train/aux_loss": event.aux_loss,
                "train/z_loss": event.z_loss,
                "train/lr": event.lr,
                "train/grad_norm": event.grad_norm,
                "train/tokens_per_sec": event.tokens_per_sec,
            },
        )
    elif isinstance(event, EvalMetrics):
        tracker.scalars(
            event.step,
            {
                "eval/train_loss": event.train_loss,
                "eval/val_loss": event.val_loss,
                "eval/train_bpc": event.train_bpc,
                "eval/val_bpc": event.val_bpc,
            },
        )
    elif isinstance(event, RouterStats):
        values: dict[str, float] = {}
        for i, layer in enumerate(event.layers):
            values.update(
                {
                    f"routing/layer{i}/dropped": layer.dropped_fraction,
                    f"routing/layer{i}/imbalance_cv": layer.imbalance,
                    f"routing/layer{i}/entropy": layer.entropy,
                }
            )
        n = len(event.layers) or 1
        values.update(
            {
                "routing/dropped": sum(la.dropped_fraction for la in event.layers) / n,
                "routing/imbalance_cv": sum(la.imbalance for la in event.layers) / n,
            }
        )
        tracker.scalars(event.step, {k: v for k, v in values.items() if math.isfinite(v)})
        for i, layer in enumerate(event.layers):
            tracker.expert_shares(event.step, i, layer.expert_fraction)
    elif isinstance(event, SettingsChanged):  # a setting changed while training: its value from then on
        tracker.scalars(event.step, {f"settings/{event.key}": float(event.new)})
        tracker.add_text(event.step, "settings/changes", f"{event.key} {event.old} -> {event.new} ({event.source})")
    elif isinstance(event, Alert):
        tracker.alert(event.step, f"moe-tui guard: {event.rule} ({event.action})", event.message)
    elif isinstance(event, Sample):
        tracker.add_text(event.step, "samples/requested" if event.requested else "samples/periodic", event.text)
