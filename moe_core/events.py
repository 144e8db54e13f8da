"""Typed events: everything the trainer tells its front ends (headless reporter, dashboard, metrics file).

Events are plain dataclasses of numbers and strings, so they cross threads, go into `metrics.jsonl`
unchanged, and can be replayed to draw a dashboard without a model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Union

LN2 = math.log(2)


@dataclass(frozen=True)
class RunStarted:
    run_name: str
    dataset: str
    device: str
    params_total: int
    params_active: int
    start_step: int
    max_iters: int
    tokens_per_step: int
    vocab_size: int
    resumed: bool


@dataclass(frozen=True)
class StepMetrics:
    """Training figures averaged over the last `log_interval` steps."""

    step: int
    loss: float  # LM cross-entropy, nats/char
    aux_loss: float
    z_loss: float
    lr: float
    grad_norm: float
    tokens_per_sec: float
    elapsed: float  # wall seconds of training so far (pauses excluded)


@dataclass(frozen=True)
class EvalMetrics:
    step: int
    train_loss: float  # nats/char
    val_loss: float
    elapsed: float

    @property
    def train_bpc(self) -> float:
        return self.train_loss / LN2

    @property
    def val_bpc(self) -> float:
        return self.val_loss / LN2


@dataclass(frozen=True)
class LayerRouting:
    expert_fraction: list[float]  # share of routed assignments per expert (sums to 1)
    dropped_fraction: float  # share of assignments over capacity
    entropy: float  # mean router entropy per token, nats (max: ln E)

    @property
    def imbalance(self) -> float:
        """Coefficient of variation of the expert loads: 0 = perfectly balanced."""
        n = len(self.expert_fraction)
        mean = 1.0 / n
        var = sum((f - mean) ** 2 for f in self.expert_fraction) / n
        return math.sqrt(var) / mean


@dataclass(frozen=True)
class RouterStats:
    step: int
    layers: list[LayerRouting]


@dataclass(frozen=True)
class ExpertChars:
    """At each evaluation, on the fixed validation batches: how many of each character's routing
    decisions went to each expert, per layer (see moe_core/model/routes.py)."""

    step: int
    chars: str  # the vocabulary, in id order
    counts: list[list[list[int]]]  # layer -> character -> expert
    # layer -> expert -> expert: tokens that picked both (the diagonal: each expert's tokens); None in runs
    # recorded before moe-tui counted them
    pairs: list[list[list[int]]] | None = None


@dataclass(frozen=True)
class Sample:
    step: int
    prompt: str
    text: str  # starts with the prompt
    requested: bool  # True when a user asked for it, False for the periodic sample
    temperature: float = 1.0
    experts: list[list[int]] | None = None  # layer -> character of `text` -> the first expert it went to


@dataclass(frozen=True)
class Probed:
    """The answer to a probe (moe_core/probe/answer.py): a text routed through the model, character by
    character; the model with experts switched off beside the unchanged one; each expert's importance."""

    step: int  # the weights' step
    source: str  # "live" (a trainer's weights) or the checkpoint read: "best", "latest", "step-00000500"
    request_id: int = 0
    text: str = ""
    experts: list[list[list[int]]] = dataclasses.field(default_factory=list)  # layer -> char -> chosen experts
    gates: list[list[list[float]]] = dataclasses.field(default_factory=list)  # layer -> char -> their gates
    loss: list[float | None] = dataclasses.field(default_factory=list)  # char -> nats (None: the first)
    changed: str = ""  # what was switched off or changed ("e3 off in layer 1, top-1"), "" for nothing
    val_loss: float | None = None  # the unchanged model's, on the fixed evaluation batches
    changed_val_loss: float | None = None
    sample: str = ""  # the unchanged model's sample, and the changed one's from the same seed
    changed_sample: str = ""
    importance: list[list[float]] | None = None  # layer -> expert -> validation loss rise with it off
    similarity: list[list[list[float]]] | None = None  # layer -> expert -> expert: cosine of their outputs


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: str
    best: bool
    val_loss: float | None


@dataclass(frozen=True)
class StateChanged:
    state: State
    message: str = ""

    def __post_init__(self) -> None:  # "running" and State.RUNNING alike; ValueError for an unknown state
        object.__setattr__(self, "state", State(self.state))


@dataclass(frozen=True)
class SettingsChanged:
    """A setting of a live run changed between steps `step` and `step + 1` (moe_core/train/settings.py)."""

    step: int
    key: str
    old: float
    new: float
    source: str = ""  # who asked: "moe-tui set", "dashboard" or "viewer" (", again after a resume")


@dataclass(frozen=True)
class Alert:
    """A rule of the guard tripped (moe_core/train/guard.py): what it saw, and what the run did about it."""

    step: int
    rule: str  # dead_expert, collapse, loss_spike, non_finite, slow_step, val_rising
    message: str
    action: str  # warn, pause or stop
    since: int = 0  # the first step of the streak that tripped it: the run was fine before


@dataclass(frozen=True)
class Notice:
    """Something the user should know: a warning or an error, with its text."""

    level: str  # "info" | "warning" | "error"
    message: str
    step: int = 0


@dataclass(frozen=True)
class ResourceUsage:
    """What the training process costs the machine, sampled by the process itself every second.

    Not logged: it goes to the front ends and over the control channel, where it is the heartbeat
    that tells a viewer the trainer is alive.
    """

    step: int  # the trainer's step counter at the time
    cpu_percent: float  # of one core, over the last interval: 200 = two cores busy
    rss_bytes: int  # resident memory
    gpu_percent: float | None = None  # CUDA only; None where unknown
    gpu_memory_bytes: int | None = None


class State(str, Enum):
    """Where a trainer is in its life, as `StateChanged` reports it. A str, so that records, replies and
    comparisons read it as its value ("running")."""

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    EVALUATING = "evaluating"
    SAVING = "saving"
    SAMPLING = "sampling"
    FINISHED = "finished"
    ERROR = "error"
    STOPPED = "stopped"
    GONE = "gone"  # a viewer's word for a trainer that died without saying so

    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__  # a key of a dict keyed by the plain value finds it, and the other way round

    @property
    def ended(self) -> bool:
        """Training is over: nothing will change until it is resumed."""
        return self in (State.FINISHED, State.ERROR, State.STOPPED, State.GONE)


Event = Union[
    RunStarted,
    StepMetrics,
    EvalMetrics,
    RouterStats,
    ExpertChars,
    Sample,
    Probed,
    CheckpointSaved,
    StateChanged,
    SettingsChanged,
    Alert,
    Notice,
    ResourceUsage,
]
EventSink = Callable[[Event], None]

# Events about the process now, not about the run: never written to metrics.jsonl.
# A probe's answer is for whoever asked: it can be large, and says nothing about the run's history.
LIVE_ONLY = (StateChanged, ResourceUsage, Probed)

EVENT_TYPES: dict[str, type] = {cls.__name__: cls for cls in Event.__args__}  # type: ignore[attr-defined]


def to_record(event: Event) -> dict[str, Any]:
    """A JSON-ready dict with the event's type under "event"."""
    record = {"event": type(event).__name__, **dataclasses.asdict(event)}
    if isinstance(event, EvalMetrics):
        record.update(train_bpc=event.train_bpc, val_bpc=event.val_bpc)
    return record


def from_line(line: str | bytes) -> Event | None:
    """The event a `metrics.jsonl` line records; None for a torn line, or one of a kind this version does
    not know (written by a newer moe-tui)."""
    try:
        return from_record(json.loads(line))
    except (KeyError, TypeError, ValueError):
        return None


def from_record(record: dict[str, Any]) -> Event:
    """Rebuild an event from a `metrics.jsonl` line (derived fields are dropped)."""
    cls = EVENT_TYPES[record["event"]]
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in record.items() if k in names}
    if cls is RouterStats:
        values["layers"] = [LayerRouting(**layer) for layer in values["layers"]]
    return cls(**values)
