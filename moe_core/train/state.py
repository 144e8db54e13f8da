"""What a checkpoint holds of a trainer, and putting it back: saving, restoring, resuming a run.

The trainer's state is its model's weights plus `training_state()`: optimizer moments, the random
streams (torch's and the batch sampler's), the step, the best validation loss, the elapsed time.
A checkpoint is those two written to the run folder (moe_core/store/checkpoint.py); with several
processes, rank 0 hands the same two to the others at start (moe_core/parallel/ranks.py), so every
rank continues from exactly where a single process would.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moe_core.store.checkpoint import load_checkpoint, restore_set_aside, step_checkpoints
from moe_core.train.checkpoint_writer import Snapshot
from moe_core.config import RESUMABLE_KEYS
from moe_core.errors import UserError

if TYPE_CHECKING:
    from moe_core.train.trainer import Trainer

# Keys that define the model's shape or its data: a checkpoint only fits a config with the same ones.
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "num_experts", "top_k", "router", "dataset",
              "columns", "encoding", "val_fraction")


def training_state(trainer: Trainer) -> dict[str, Any]:
    """Everything but the weights that training needs to go on exactly: plain tensors and values."""
    state = {"optimizer": trainer.optimizer.state_dict(), "rng": torch.get_rng_state(),
             "batches_rng": trainer.batches.generator.get_state(), "step": trainer.step_num,
             "best_val": trainer.best_val, "elapsed": trainer.elapsed}
    if trainer.device.startswith("cuda"):
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def load_training_state(trainer: Trainer, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """The inverse of the model's state_dict and `training_state`."""
    trainer.model.load_state_dict(weights)
    trainer.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    if trainer.device.startswith("cuda") and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"])
    trainer.batches.generator.set_state(state["batches_rng"])
    trainer.step_num = int(state["step"])
    trainer.best_val = float(state["best_val"])
    trainer.elapsed = float(state["elapsed"])


def to_save(trainer: Trainer, best: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and training state a checkpoint holds (`best`, kept for sampling only: without the
    optimizer's moments, two thirds of the size). With expert parallelism every expert, gathered from
    every rank: a collective that all ranks call."""
    weights, state = trainer.model.state_dict(), training_state(trainer)
    if best:
        del state["optimizer"]
    if trainer.expert_parallel is not None:
        weights, state = trainer.expert_parallel.whole_state(trainer.model, trainer.optimizer, state)
    return weights, state


def snapshot(trainer: Trainer, best: bool, saved: tuple[dict[str, torch.Tensor], dict[str, Any]],
             rank_rng: list | None = None) -> Snapshot:
    """A step checkpoint, or `best`, ready to write: `saved` (what `to_save` returns) copied to host
    memory, with its manifest. `rank_rng`: with several processes, every rank's random streams, so
    that a resume on as many continues each rank's own."""
    c = trainer.config
    shape = {k: getattr(c, k) for k in SHAPE_KEYS}
    manifest = {"step": trainer.step_num, "shape": shape,
                "config_hash": hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest(),
                "config": {k: getattr(c, k) for k in sorted(RESUMABLE_KEYS)},
                "val_loss": None if math.isinf(trainer.best_val) else trainer.best_val,
                "created": time.time()}
    weights, state = saved  # `to_save`'s
    if rank_rng is not None:
        state = {**state, "rank_rng": rank_rng}
    folder = trainer.run_dir.checkpoints / ("best" if best else f"step-{trainer.step_num:08d}")
    return Snapshot.take(folder, weights, state, manifest, trainer.step_num, best, c.keep_checkpoints)


def resume(trainer: Trainer) -> None:
    """Continue from the newest intact checkpoint, after repairing what a crash can leave behind."""
    run = trainer.run_dir
    for name in restore_set_aside(run.checkpoints):
        trainer.note("info", f"restored checkpoint {name} from the copy set aside by an interrupted save")
    if step_checkpoints(run.checkpoints):
        restore(trainer, run.checkpoint("latest", on_skip=lambda why: trainer.note("warning", why)))
    else:
        trainer.note("info", "the run stopped before its first checkpoint; training starts again from step 0")
    try:
        dropped = run.rewind(trainer.step_num)
    except OSError as err:
        raise UserError(f"cannot rewrite {run.metrics_path} ({err}); free some space or fix "
                        "its permissions, then resume again") from None
    if dropped:
        trainer.note("info", f"dropped {dropped} metrics line(s) logged after step {trainer.step_num} "
                             "(or torn by the interruption); they will be logged again")


def restore(trainer: Trainer, folder: Path) -> None:
    weights, state, manifest = load_checkpoint(folder, verify=False)  # `checkpoint()` checked it
    config = trainer.config
    saved_shape = manifest.get("shape", {})
    differ = [k for k in SHAPE_KEYS if k in saved_shape and saved_shape[k] != getattr(config, k)]
    if differ:
        raise UserError(f"checkpoint {folder} was made with a different "
                        f"{', '.join(differ)}; resume with the run's own settings or start a new run")
    if any(key.endswith(".experts.0.fc.weight") for key in weights):
        # Its weights convert on load (see MoE.convert_expert_keys); its optimizer state does not.
        raise UserError(f"checkpoint {folder} was saved by an older moe-tui, with one tensor per expert: "
                        "`moe-tui sample` still reads it, but training cannot resume from it; start a new run")
    try:
        load_training_state(trainer, weights, state)
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise UserError(f"checkpoint {folder} does not fit this model ({str(err).splitlines()[0][:160]}); "
                        "resume with the run's own settings or start a new run") from None
    for group in trainer.optimizer.param_groups:  # a resumed run may ask for a new --lr
        group["initial_lr"] = config.lr
    trainer.last_saved_step = trainer.step_num
    trainer.resumed_rank_rng = state.get("rank_rng")  # for the other ranks (distributed.copy_from_leader)
    before = manifest.get("config", {})
    changed = [f"{k} {before[k]} -> {getattr(config, k)}" for k in sorted(before)
               if k in RESUMABLE_KEYS and before[k] != getattr(config, k)]
    if changed:
        trainer.note("info", f"resumed from {folder.name} with changed settings: {', '.join(changed)}")
