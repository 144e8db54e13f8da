"""Expert parallelism: with N processes, each holds E/N of every MoE layer's experts.

Data parallelism (moe_core/parallel/ranks.py) gives every rank the whole model. Expert parallelism, the
way large MoE models are trained, splits the experts instead: rank r keeps experts [r*E/N, (r+1)*E/N)
of each layer, and the rest of the model (attention, embeddings, routers) stays replicated. Each rank
still trains on its slice of the global batch. Each MoE layer's token dispatcher
(moe_core/model/dispatch.py) is swapped for `AllToAllDispatch`:

1. each rank routes its own tokens and sorts the assignments by expert (as `LocalDispatch` does);
2. one all-to-all sends every row to the rank that holds its expert (and first, a small one, how many
   rows of each expert each rank will receive);
3. each rank runs its experts on the rows it received from all ranks;
4. a second all-to-all sends the outputs back, and each rank combines them with its gates.

The backward pass runs the two exchanges in reverse (`_AllToAll`). An expert's weight gradient then
sums the contributions of every rank's tokens, so it is divided by N (each rank's loss is a mean over
its slice) where data parallelism would average; the replicated weights are averaged as before.
Routing, capacity and the losses are those of data parallelism, so training follows the same curve.

Checkpoints hold every expert, as a single process's do: saving gathers the experts (weights and
optimizer moments) to rank 0's host memory, and a rank takes its share after loading a whole model. A
run resumes on any number of processes, with or without expert parallelism. Sampling runs on rank 0,
with every expert gathered to it for the moment.

What this saves is the memory of training: each rank's experts' weights, gradients and Adam moments.
Each rank still builds (or, resuming, receives) the whole model before keeping its share.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn

from moe_core.config import Config
from moe_core.errors import UserError
from moe_core.model.dispatch import LocalDispatch, sort_by_expert
from moe_core.model.moe import MoE, StackedExperts
from moe_core.optim import AdamW
from moe_core.parallel.ranks import Ranks, collective


def check_expert_parallel(config: Config, world: int) -> None:
    """What `--expert-parallel` needs: several processes, an equal share of experts each, stacked experts."""
    num_experts = config.num_experts
    if world < 2:
        raise UserError(
            "--expert-parallel splits the experts over several processes; add --nproc N "
            "(or start under torchrun), or drop --expert-parallel"
        )
    if num_experts % world:
        raise UserError(
            f"--expert-parallel gives each of the {world} processes an equal share of the "
            f"--num-experts {num_experts} experts; use a number of experts divisible by {world} "
            f"(e.g. --num-experts {world * max(1, num_experts // world)}), or another --nproc"
        )
    if config.compile:
        raise UserError(
            "--expert-parallel exchanges rows of a size known only at run time, which torch.compile "
            "would recompile for; drop --compile, or train data parallel (without --expert-parallel)"
        )
    if config.moe_impl != "fast":
        raise UserError(
            f"--expert-parallel sends rows to stacked experts; --moe-impl {config.moe_impl} has one "
            "module per expert; use --moe-impl fast (the default)"
        )


class _AllToAll(torch.autograd.Function):
    """Rows to other ranks: `send[j]` rows of x to rank j, `receive[j]` rows from rank j. Its backward
    is the same exchange the other way round."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], receive: list[int]) -> torch.Tensor:
        ctx.send, ctx.receive = send, receive
        out = x.new_empty((sum(receive), *x.shape[1:]))
        collective(torch.distributed.all_to_all_single, out, x.contiguous(), receive, send)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        collective(torch.distributed.all_to_all_single, back, grad.contiguous(), ctx.send, ctx.receive)
        return back, None, None


class AllToAllDispatch:
    """A MoE layer's dispatcher when each rank holds `num_experts / world` of its experts (the layer's
    `experts`): every row goes to the rank of its expert and its output comes back (steps 1-4 above)."""

    def __init__(self, world: int, num_experts: int):
        self.world, self.num_experts, self.per_rank = world, num_experts, num_experts // world

    def __call__(
        self,
        experts: nn.Module,
        x: torch.Tensor,
        weights: torch.Tensor,
        expert_idx: torch.Tensor,
        capacity: int | None,
        counts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`LocalDispatch` with the experts on their ranks: (N, C) combined output, assignments dropped."""
        world, per_rank = self.world, self.per_rank
        # As on one process: sorted by expert, so each rank's rows are together; capacity applied here.
        token, _, gate, counts, dropped = sort_by_expert(weights, expert_idx, self.num_experts, capacity, counts)

        # How many rows of each of its experts every rank receives from every other: (world, per_rank).
        received = torch.empty_like(counts)
        collective(torch.distributed.all_to_all_single, received, counts.contiguous())
        received = received.view(world, per_rank)
        send = counts.view(world, per_rank).sum(1).tolist()  # split sizes are read on the host
        receive = received.sum(1).tolist()
        rows = _AllToAll.apply(x.index_select(0, token), send, receive)

        # Received rows come rank by rank, each rank's by expert: regroup them by expert for one
        # grouped call, then put the outputs back in the order they came.
        local_expert = torch.arange(per_rank, device=x.device).repeat(world).repeat_interleave(received.flatten())
        regroup = torch.argsort(local_expert, stable=True)
        out_rows = experts(rows.index_select(0, regroup), local_expert.index_select(0, regroup), received.sum(0))
        back = torch.empty_like(regroup)
        back[regroup] = torch.arange(regroup.numel(), device=x.device)
        returned = _AllToAll.apply(out_rows.index_select(0, back), receive, send)
        return torch.zeros_like(x).index_add_(0, token, returned * gate), dropped  # in x's dtype, as on one process


class ExpertParallel:
    """This rank's share of the experts, and what training with shares needs: the all-to-all
    dispatcher in every MoE layer, the gradients, their norm, and the whole model back for checkpoints
    and samples."""

    def __init__(self, ranks: Ranks, config: Config, model: nn.Module, optimizer: AdamW):
        """From a whole model (and its optimizer) that every rank holds alike: this rank keeps its share."""
        check_expert_parallel(config, ranks.world)
        self.ranks = ranks
        self.num_experts, self.per_rank = config.num_experts, config.num_experts // ranks.world
        self.first = ranks.rank * self.per_rank
        self.layers = [m for m in model.modules() if isinstance(m, MoE) and isinstance(m.experts, StackedExperts)]
        # The expert parameters, by state-dict name: after `_keep_own`, this rank's share of each.
        names = {id(p): name for name, p in model.named_parameters()}
        self.experts = {names[id(p)]: p for moe in self.layers for p in moe.experts.parameters()}
        self.expert_ids = {id(p) for p in self.experts.values()}  # local, not replicated
        self.dispatcher = AllToAllDispatch(ranks.world, self.num_experts)
        self._keep_own(optimizer)

    # -- setting up ----------------------------------------------------------------------------

    def _keep_own(self, optimizer: AdamW) -> None:
        """Drop the other ranks' experts from the model and from its optimizer's moments (the same
        Parameter objects keep their place in the optimizer), and send each layer's rows to the ranks."""
        own = slice(self.first, self.first + self.per_rank)
        for p in self.experts.values():
            for key, value in optimizer.state.get(p, {}).items():
                if _is_moment(value, p):
                    optimizer.state[p][key] = value[own].clone()
            p.data = p.data[own].clone()
        for moe in self.layers:
            moe.dispatcher = self.dispatcher

    # -- gradients -----------------------------------------------------------------------------

    def average_and_clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """`Ranks.average_gradients`, then `clip_grad_norm_` over the whole model, experts on every rank
        included: the replicated gradients' squares once, every rank's experts' summed over ranks."""
        self.ranks.average_gradients(model, local=self.expert_ids)
        grads = [(id(p) in self.expert_ids, p.grad) for p in model.parameters() if p.grad is not None]
        zero = torch.zeros((), device=grads[0][1].device)

        def squares(local: bool) -> torch.Tensor:
            return sum((g.float().square().sum() for is_own, g in grads if is_own == local), zero)

        total = (self.ranks.sum(squares(local=True)) + squares(local=False)).sqrt()
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)  # as clip_grad_norm_ does
        for _, g in grads:
            g.mul_(scale.to(g.dtype))
        return total

    # -- the whole model, for checkpoints and samples (collectives: every rank calls them) ---------

    def whole_experts(self, to_host: bool = False) -> dict[str, torch.Tensor | None]:
        """Every expert parameter of the model, gathered on rank 0 (on the host, `to_host`), by its
        state-dict name; None on the other ranks."""
        return {name: self._gather(p.detach(), to_host) for name, p in self.experts.items()}

    def whole_state(
        self, model: nn.Module, optimizer: AdamW, state: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The model's weights and training state (`Learner.state_dict()`) as one process would have them, every expert and
        its moments gathered on rank 0's host memory, one tensor at a time (the other ranks send theirs
        and get their own state back, unchanged)."""
        experts = self.whole_experts(to_host=True)
        moments = {}  # optimizer-state index -> that expert parameter's moments, every rank's
        if "optimizer" in state:
            saved = state["optimizer"]["state"]  # keyed by the parameters' order in the groups
            for index, p in enumerate(p for group in optimizer.param_groups for p in group["params"]):
                if id(p) in self.expert_ids and index in saved:
                    moments[index] = {
                        k: self._gather(v, to_host=True) if _is_moment(v, p) else v for k, v in saved[index].items()
                    }
        if not self.ranks.leader:
            return model.state_dict(), state
        if moments:
            saved = state["optimizer"]
            state = {**state, "optimizer": {**saved, "state": {**saved["state"], **moments}}}
        return {**model.state_dict(), **experts}, state

    @contextmanager
    def whole_model(self) -> Iterator[bool]:
        """For a while, on rank 0, the model with every expert (to sample from): True there, False on
        the others. The gathered experts stand in for this rank's share and run with the local
        dispatcher; the share and the all-to-all dispatcher come back afterwards."""
        experts = self.whole_experts()
        if not self.ranks.leader:
            yield False
            return
        own = {name: p.data for name, p in self.experts.items()}
        try:
            for name, tensor in experts.items():
                self.experts[name].data = tensor
            for moe in self.layers:
                moe.dispatcher = LocalDispatch()
            yield True
        finally:
            for name, tensor in own.items():
                self.experts[name].data = tensor
            for moe in self.layers:
                moe.dispatcher = self.dispatcher

    def _gather(self, tensor: torch.Tensor, to_host: bool = False) -> torch.Tensor | None:
        """All ranks' shares of one tensor, joined along the experts, on rank 0; None on the others."""
        parts = [torch.empty_like(tensor) for _ in range(self.ranks.world)] if self.ranks.leader else None
        collective(torch.distributed.gather, tensor.contiguous(), parts, 0)
        if parts is None:
            return None
        return torch.cat([part.cpu() for part in parts] if to_host else parts)


def _is_moment(value: Any, p: nn.Parameter) -> bool:
    """One of Adam's moments of `p` (shaped like it), not its step count."""
    return isinstance(value, torch.Tensor) and value.shape == p.shape
