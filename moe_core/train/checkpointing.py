"""A trainer's checkpoints: the snapshot it writes, and resuming from the newest one.

What a checkpoint holds is the trainer's `state_dict()`: `{"model": weights, "training": ...}`, the
training part being the optimizer's moments, the random streams (torch's and the batch sampler's),
the step, the best validation loss and the elapsed time. `snapshot` lays that out as a checkpoint
folder (moe_core/store/checkpoint.py writes it); `resume` reads the newest intact one back into a
trainer through its `load_state_dict()`. Neither touches the trainer's attributes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from moe_core.config import RESUMABLE_KEYS, Config
from moe_core.errors import UserError
from moe_core.events import SettingsChanged
from moe_core.store.checkpoint import load_checkpoint, restore_set_aside, step_checkpoints
from moe_core.store.runs import Run
from moe_core.train.checkpoint_writer import Snapshot
from moe_core.train.settings import pending_after

# Keys that define the model's shape or its data: a checkpoint only fits a config with the same ones.
SHAPE_KEYS = (
    "n_layer",
    "n_head",
    "n_embd",
    "block_size",
    "num_experts",
    "top_k",
    "router",
    "dataset",
    "columns",
    "encoding",
    "val_fraction",
)

Note = Callable[[str, str], None]  # (level, message): said when training starts


class Stateful(Protocol):
    """What `resume` loads a checkpoint into: a trainer."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def snapshot(run: Run, config: Config, state: dict[str, Any], best: bool, rank_rng: list | None = None) -> Snapshot:
    """A step checkpoint, or `best`, ready to write: a trainer's `state_dict()` copied to host memory,
    with its manifest. `rank_rng`: with several processes, every rank's random streams, so that a
    resume on as many continues each rank's own."""
    training = state["training"]
    step, best_val = training["step"], training["best_val"]
    shape = {k: getattr(config, k) for k in SHAPE_KEYS}
    manifest = {
        "step": step,
        "shape": shape,
        "config_hash": hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest(),
        "config": {k: getattr(config, k) for k in sorted(RESUMABLE_KEYS)},
        "val_loss": None if math.isinf(best_val) else best_val,
        "created": time.time(),
    }
    if rank_rng is not None:
        training = {**training, "rank_rng": rank_rng}
    folder = run.checkpoints / ("best" if best else f"step-{step:08d}")
    return Snapshot.take(folder, state["model"], training, manifest, step, best, config.keep_checkpoints)


def resume(trainer: Stateful, run: Run, config: Config, note: Note) -> tuple[dict[str, Any], list[SettingsChanged]]:
    """Load the run's newest intact checkpoint into `trainer`, after repairing what a crash can leave
    behind, and drop the metrics logged after it (they will be logged again). Returns the live settings
    in effect at that checkpoint where they changed after it, and those changes, to be made again at
    their steps (moe_core/train/settings.py)."""
    for name in restore_set_aside(run.checkpoints):
        note("info", f"restored checkpoint {name} from the copy set aside by an interrupted save")
    step, at_step, pending = 0, {}, []
    if step_checkpoints(run.checkpoints):
        folder = run.checkpoint("latest", on_skip=lambda why: note("warning", why))
        state, manifest = read_resumable(folder, config)
        try:
            trainer.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise UserError(
                f"checkpoint {folder} does not fit this model ({str(err).splitlines()[0][:160]}); "
                "resume with the run's own settings or start a new run"
            ) from None
        step = int(state["training"]["step"])
        at_step, pending = pending_after(step, run.events(), config)  # before the rewind cuts them from the log
        _note_changed(folder, manifest, dataclasses.replace(config, **at_step), note)  # at the checkpoint's step
    else:
        note("info", "the run stopped before its first checkpoint; training starts again from step 0")
        at_step, pending = pending_after(0, run.events(), config)
    try:
        dropped = run.rewind(step)
    except OSError as err:
        raise UserError(
            f"cannot rewrite {run.metrics_path} ({err}); free some space or fix its permissions, then resume again"
        ) from None
    if dropped:
        note(
            "info",
            f"dropped {dropped} metrics line(s) logged after step {step} "
            "(or torn by the interruption); they will be logged again",
        )
    return at_step, pending


def read_resumable(folder, config: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    """A step checkpoint as a trainer's `state_dict()`, and its manifest, after checking that it fits
    `config`."""
    weights, training, manifest = load_checkpoint(folder, verify=False)  # `Run.checkpoint()` checked it
    saved_shape = manifest.get("shape", {})
    differ = [k for k in SHAPE_KEYS if k in saved_shape and saved_shape[k] != getattr(config, k)]
    if differ:
        raise UserError(
            f"checkpoint {folder} was made with a different "
            f"{', '.join(differ)}; resume with the run's own settings or start a new run"
        )
    if any(key.endswith(".experts.0.fc.weight") for key in weights):
        # Its weights convert on load (see MoE.convert_expert_keys); its optimizer state does not.
        raise UserError(
            f"checkpoint {folder} was saved by an older moe-tui, with one tensor per expert: "
            "`moe-tui sample` still reads it, but training cannot resume from it; start a new run"
        )
    return {"model": weights, "training": training}, manifest


def _note_changed(folder, manifest: dict[str, Any], config: Config, note: Note) -> None:
    """Say which settings a resume changes from those the checkpoint was saved with."""
    before = manifest.get("config", {})
    changed = [
        f"{k} {before[k]} -> {getattr(config, k)}"
        for k in sorted(before)
        if k in RESUMABLE_KEYS and before[k] != getattr(config, k)
    ]
    if changed:
        note("info", f"resumed from {folder.name} with changed settings: {', '.join(changed)}")


LAST_GOOD = "last-good"


def keep_last_good(run: Run, before: int) -> Path | None:
    """Copy the newest step checkpoint taken at or before step `before` to checkpoints/last-good, out of
    --keep-checkpoints' reach: what the guard keeps of a run from before it went wrong. None if none."""
    for step, folder in step_checkpoints(run.checkpoints):
        if step <= before:
            target, tmp = run.checkpoints / LAST_GOOD, run.checkpoints / f".tmp-{LAST_GOOD}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(folder, tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            return folder
    return None
