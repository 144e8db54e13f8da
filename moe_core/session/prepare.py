"""What to train: a new run or a resumed one, its settings, corpus and vocabulary, checked and read
before anything is written.

    plan = prepare(TrainRequest(dataset="simpsons", settings={"max_iters": 500}))

Settings come from a preset, then a TOML file, then the request's own (later wins); a resumed run keeps
its saved settings and takes only those that leave the model and its data alone.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from moe_core.config import Config, build_config, diff_for_resume, read_toml, resolve_device, validate
from moe_core.data.batches import token_ids
from moe_core.data.corpus import Corpus, default_data_dir, load_corpus
from moe_core.data.vocab import Vocab
from moe_core.errors import UserError
from moe_core.hints import resume_command
from moe_core.session.fork import Fork, plan_fork
from moe_core.store.runs import Run, default_runs_dir
from moe_core.track import check_trackers

Progress = Callable[[int, "int | None"], None]  # (bytes done, total): a download's progress


@dataclass
class TrainRequest:
    """What a user asked to train, from the command line or from Python."""

    dataset: str | None = None  # shakespeare, simpsons, a file or a URL; None: the config's (shakespeare)
    preset: str | None = None
    config_file: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # Config keys given explicitly (flags)
    run_name: str | None = None
    resume: str | None = None  # the name of a run to continue
    fork: str | None = None  # RUN, RUN@STEP or RUN@best: a new run from that checkpoint (moe_core/session/fork.py)
    overwrite: bool = False
    data_dir: Path | None = None
    runs_dir: Path | None = None
    nproc: int | None = None  # processes to start (`--nproc`); None inside a rank or a single process
    expert_parallel: bool = False

    def __post_init__(self) -> None:
        self.data_dir = self.data_dir or default_data_dir()
        self.runs_dir = self.runs_dir or default_runs_dir()


@dataclass
class Plan:
    """A run ready to train: its settings, folder, text and vocabulary."""

    config: Config
    run: Run
    vocab: Vocab
    text: str
    device: str  # resolved: cpu, cuda or mps
    resuming: bool
    changed: dict[str, Any]  # on a resume, the settings that differ from the run's saved ones
    fork: Fork | None = None  # a fork: its parent's checkpoint goes into the new run before training

    def token_ids(self) -> torch.Tensor:
        return token_ids(self.vocab, self.text)


def prepare(request: TrainRequest, leader: bool = True, progress: Progress | None = None) -> Plan:
    """Check and read what `request` trains; refuses with a UserError. Writes nothing, except that a new
    run's folder name is taken (`Run.prepare`) on the leader."""
    if request.resume and request.fork:
        raise UserError("--resume continues a run and --fork starts a new one from another; pick one")
    if request.resume:
        return _resumed(request, progress)
    if request.fork:
        return _forked(request, leader, progress)
    values = {**request.settings, **({"dataset": request.dataset} if request.dataset is not None else {})}
    config = build_config(request.preset, read_toml(request.config_file) if request.config_file else {}, values)
    check_trackers(config.track)
    device = resolve_device(config.device)
    corpus = _corpus(config, request, progress)
    name = request.run_name or f"{corpus.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = Run.prepare(request.runs_dir, name, request.overwrite) if leader else Run(request.runs_dir / name)
    return Plan(config, run, Vocab.from_text(corpus.text), corpus.text, device, resuming=False, changed={})


def _resumed(request: TrainRequest, progress: Progress | None) -> Plan:
    name = request.resume
    if request.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if request.run_name and request.run_name != name:
        raise UserError("--run-name names a new run; with --resume the run keeps its own name")
    run = Run.open(request.runs_dir, name)
    saved = run.load_config()
    requested = {**(read_toml(request.config_file) if request.config_file else {}), **request.settings}
    requested.update({k: v for k, v in (("dataset", request.dataset), ("preset", request.preset)) if v is not None})
    allowed, refused = diff_for_resume(saved, requested)
    if refused:
        raise UserError(
            f"cannot resume '{name}' with a different {', '.join(sorted(refused))}: that changes "
            f"the model or its data; drop those flags (`{resume_command(name, request.runs_dir)}`), or "
            "start a new run"
        )
    config = dataclasses.replace(saved, **allowed)
    validate(config)
    check_trackers(config.track)
    device = resolve_device(config.device)
    corpus = _corpus(config, request, progress)
    vocab = run.load_vocab()
    if Vocab.from_text(corpus.text) != vocab:
        raise UserError(
            f"the text of '{config.dataset}' has changed since run '{name}' started (its characters "
            "differ); restore the original file or start a new run"
        )
    return Plan(config, run, vocab, corpus.text, device, resuming=True, changed=allowed)


def _forked(request: TrainRequest, leader: bool, progress: Progress | None) -> Plan:
    if request.overwrite:
        raise UserError("--fork starts a new run from another; --overwrite has nothing to replace: drop it")
    if request.dataset is not None or request.preset is not None or request.config_file is not None:
        raise UserError("a fork trains on its parent's data with its parent's model; drop the dataset, --preset "
                        "and --config, and give only the settings to change (e.g. --lr)")  # fmt: skip
    fork, config = plan_fork(request.fork, request.runs_dir, request.settings)
    validate(config)
    device = resolve_device(config.device)
    check_trackers(config.track)
    corpus = _corpus(config, request, progress)
    vocab = fork.parent.load_vocab()
    if Vocab.from_text(corpus.text) != vocab:
        raise UserError(f"the text of '{config.dataset}' has changed since run '{fork.parent.name}' started (its "
                        "characters differ); restore the original file to fork it")  # fmt: skip
    name = request.run_name or f"{fork.parent.name}-fork{fork.step}"
    if (request.runs_dir / name).exists():
        raise UserError(f"run '{name}' exists already; name the fork with --run-name")
    run = Run.prepare(request.runs_dir, name, overwrite=False) if leader else Run(request.runs_dir / name)
    return Plan(config, run, vocab, corpus.text, device, resuming=True, changed={}, fork=fork)


def _corpus(config: Config, request: TrainRequest, progress: Progress | None) -> Corpus:
    return load_corpus(
        config.dataset, request.data_dir, columns=config.columns, encoding=config.encoding, progress=progress
    )
