"""The learning part of training: the model, its optimizer and data, one optimizer step, the evaluation,
and what a checkpoint holds of them (`state_dict()` / `load_state_dict()`, the pattern of
torch.distributed.checkpoint's Stateful). The loop around it is moe_core/train/trainer.py.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from typing import Any

import torch

from moe_core.config import LIVE_KEYS, Config, resolve_device
from moe_core.data.batches import Batches, evaluation_batches, split_ids
from moe_core.data.vocab import Vocab
from moe_core.errors import UserError
from moe_core.events import EvalMetrics, ExpertChars, SettingsChanged
from moe_core.model.routes import RouteCounter
from moe_core.model.sampling import SampleRequest, complete
from moe_core.model.transformer import MoETransformer
from moe_core.optim import AdamW
from moe_core.parallel.experts import ExpertParallel
from moe_core.parallel.ranks import SINGLE, Ranks, on_cpu, set_rng_state
from moe_core.train.step_log import StepWindow


class Learner:
    """A model with its optimizer and data: one optimizer step, an evaluation, a sample, and `state_dict()`
    / `load_state_dict()`, the one place that reads and writes what a checkpoint holds."""

    def __init__(
        self, config: Config, vocab: Vocab, ids: torch.Tensor, ranks: Ranks = SINGLE, device: str | None = None
    ):
        """A fresh model and optimizer, touching no file. `ranks` and `device` (`cuda:LOCAL_RANK`) come from
        `ranks.start` with several processes."""
        self.config, self.vocab, self.ranks = config, vocab, ranks
        self.device = device or resolve_device(config.device)

        self.train_ids, self.val_ids = split_ids(ids, config.val_fraction)
        shortest = min(len(self.train_ids), len(self.val_ids))
        if shortest <= config.block_size + 1:
            raise UserError(
                f"the corpus is too short: {len(ids)} characters leave {shortest} in the smaller "
                f"split, and --block-size {config.block_size} needs more than "
                f"{config.block_size + 1}; use a longer text or a smaller --block-size"
            )

        torch.manual_seed(config.seed)
        with torch.device(self.device):  # initialised where it trains: on a GPU that takes no time
            self.model = MoETransformer(config, len(vocab))
        for moe in self.model.moe_layers():  # the load-balancing loss sees the global batch's routing
            moe.sum_over_ranks = ranks.sum if ranks.parallel else None
        self.params_total, self.params_active = self.model.num_params()
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.optimizer = self._make_optimizer()
        self.batches = Batches(self.train_ids, config.block_size, config.batch_size, config.seed, ranks.shard)
        # bf16 autocast on CUDA: matmuls at tensor-core speed, weights and optimizer stay fp32.
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.startswith("cuda") else nullcontext()
        )

        self.step_num = 0
        self.best_val = math.inf
        self.elapsed = 0.0  # training wall time, pauses excluded
        self.last_saved_step = -1
        self.rank_rng: list | None = None  # every rank's random streams, from the checkpoint resumed
        self.pending_settings: list[SettingsChanged] = []  # logged after the checkpoint resumed: made again
        self.expert_parallel: ExpertParallel | None = None
        self.window = StepWindow(ranks)  # the steps since the last log line

    def _make_optimizer(self) -> AdamW:
        # Decay matrices only (nanoGPT): biases, LayerNorm gains and embeddings' scale stay free.
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.config.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return AdamW(groups, lr=self.config.lr, betas=(0.9, 0.95))

    # -- what a checkpoint holds -----------------------------------------------------------------

    def state_dict(self, optimizer: bool = True) -> dict[str, Any]:
        """{"model": weights, "training": everything else training needs to go on exactly}, plain tensors
        and values. `optimizer=False` leaves out Adam's moments (`best`, kept for sampling only: a third
        of the size). With expert parallelism a collective that every rank calls: each expert and its
        moments are gathered on rank 0."""
        training = {
            "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "batches_rng": self.batches.generator.get_state(),
            "step": self.step_num,
            "best_val": self.best_val,
            "elapsed": self.elapsed,
        }
        if self.device.startswith("cuda"):
            training["cuda_rng"] = torch.cuda.get_rng_state()
        if not optimizer:
            del training["optimizer"]
        weights = self.model.state_dict()
        if self.expert_parallel is not None:
            weights, training = self.expert_parallel.whole_state(self.model, self.optimizer, training)
        return {"model": weights, "training": training}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The inverse of `state_dict()` (of a whole model: before the experts are shared out)."""
        training = state["training"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(training["optimizer"])
        for group in self.optimizer.param_groups:  # a resumed run may ask for a new --lr
            group["initial_lr"] = self.config.lr
        self.optimizer.param_groups[0]["weight_decay"] = self.config.weight_decay  # and a new --weight-decay
        torch.set_rng_state(training["rng"])
        if self.device.startswith("cuda") and "cuda_rng" in training:
            torch.cuda.set_rng_state(training["cuda_rng"])
        self.batches.generator.set_state(training["batches_rng"])
        self.step_num = int(training["step"])
        self.best_val = float(training["best_val"])
        self.elapsed = float(training["elapsed"])
        self.last_saved_step = self.step_num  # it came from a checkpoint
        self.rank_rng = training.get("rank_rng")  # with several processes: every rank's own streams

    def apply_settings(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Take settings that leave the model's shape alone (checked: moe_core/train/settings.py) between
        two steps; returns their old values. The learning rate, its schedule, the clip, the loss weights
        and the intervals are read from the config at each step; the layers and the optimizer hold the rest."""
        old = {key: getattr(self.config, key) for key in changes}
        self.config = dataclasses.replace(self.config, **changes)
        self.model.set_live(self.config)
        self.optimizer.param_groups[0]["weight_decay"] = self.config.weight_decay  # the matrices' group
        return old

    def _take_leaders_state(self) -> None:
        """Rank 0's weights and state (fresh, or just resumed) on every rank: only rank 0 reads the run folder."""
        if not self.ranks.parallel:
            return
        live = {key: getattr(self.config, key) for key in LIVE_KEYS}  # after a resume: those in effect then
        leaders = (self.state_dict(), self.last_saved_step, self.rank_rng, live, self.pending_settings)
        state, last_saved, rank_rng, live, pending = self.ranks.from_leader(
            on_cpu(leaders) if self.ranks.leader else None
        )
        if self.ranks.leader:
            return
        self.load_state_dict(state)
        self.last_saved_step = last_saved
        self.apply_settings({key: value for key, value in live.items() if getattr(self.config, key) != value})
        self.pending_settings = pending
        # Dropout and router noise draw from torch's stream: each rank needs its own, or every slice of
        # the batch would get the same masks. Rank 0 goes on with the run's; on a fresh start rank r seeds
        # from it and r. Step checkpoints keep every rank's stream, so a resume on as many processes draws
        # exactly what the uninterrupted run would have.
        if rank_rng is not None and len(rank_rng) == self.ranks.world:
            set_rng_state(rank_rng[self.ranks.rank], self.device)
        else:
            torch.manual_seed(int(torch.randint(2**62, (1,))) + self.ranks.rank)

    @property
    def unsaved(self) -> bool:
        """Steps taken since the last checkpoint (after a failed final save, say)."""
        return self.last_saved_step < self.step_num

    # -- training, evaluating, sampling -------------------------------------------------------

    def lr_at(self, step: int) -> float:
        c = self.config
        if step < c.warmup_iters:
            return c.lr * (step + 1) / c.warmup_iters
        if c.lr_schedule == "constant":
            return c.lr
        progress = min(1.0, (step - c.warmup_iters) / max(1, c.max_iters - c.warmup_iters))
        floor = c.lr * c.min_lr_ratio
        return floor + 0.5 * (c.lr - floor) * (1 + math.cos(math.pi * progress))

    def step(self) -> None:
        """One optimizer step on one batch."""
        c = self.config
        lr = self.lr_at(self.step_num)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        x, y = self.batches.next(self.device)
        with self.autocast:
            out = self.forward(x, y)
        loss = out.loss + c.aux_loss_coef * out.aux_loss + c.z_loss_coef * out.z_loss
        self.optimizer.zero_grad()
        loss.backward()
        limit = c.grad_clip if c.grad_clip > 0 else math.inf
        if self.expert_parallel:
            norm = self.expert_parallel.average_and_clip(self.model, limit)
        else:
            self.ranks.average_gradients(self.model)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit)
        self.optimizer.step()
        self.step_num += 1
        self.window.add(out.loss, out.aux_loss, out.z_loss, norm)

    @torch.no_grad()
    def evaluate(self) -> tuple[EvalMetrics, ExpertChars]:
        """Mean loss over `eval_iters` batches of each split, the same batches every time; and which
        characters each expert took in the validation batches."""
        self.model.eval()
        losses = []
        routes = RouteCounter(self.model, len(self.vocab))
        for i, ids in enumerate((self.train_ids, self.val_ids)):
            batches = evaluation_batches(ids, self.config, i, self.ranks.shard)
            total = torch.zeros((), device=self.device)
            # The validation split runs uncompiled, so that its routers can be hooked without a recompile.
            forward, recording = (self.model, routes.recording()) if i else (self.forward, nullcontext())
            with recording:
                for _ in range(self.config.eval_iters):
                    x, y = batches.next(self.device)
                    with self.autocast:
                        total += forward(x, y).loss
                    if i:
                        routes.add(x)
            losses.append(self.ranks.mean(total).item() / self.config.eval_iters)
        return (
            EvalMetrics(self.step_num, losses[0], losses[1], round(self.elapsed, 3)),
            ExpertChars(
                self.step_num,
                "".join(self.vocab.chars),
                self.ranks.sum(routes.counts).tolist(),
                self.ranks.sum(routes.pairs).tolist(),
            ),
        )

    def sample(self, request: SampleRequest) -> str:
        """Text that starts with the prompt (seeded by the step unless the request names a seed)."""
        return complete(self.model, self.vocab, request, default_seed=self.config.seed + self.step_num)[0]
