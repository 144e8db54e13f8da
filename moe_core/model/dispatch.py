"""Token dispatch: how a MoE layer gets each token to its experts and their outputs back.

The router picks, for each of N tokens, k experts and k gate weights. A dispatcher does the rest:

1. group the N*k token->expert assignments by expert, and drop those past an expert's capacity;
2. run each expert on the tokens assigned to it;
3. add each output back to its token, weighted by the gate: out[n] = sum over its experts of g * expert(x[n]).

A layer holds one (`MoE.dispatcher`) and calls it; swapping it changes where the experts run, not the
maths. Here are the two that run on one process:

* `LocalDispatch` (the `MoE` layer's): sort the assignments by expert and run every expert on its
  contiguous slice of rows in one grouped call, then scatter the results back with `index_add_`.
* `MaskedDispatch` (the `ReferenceMoE` layer's, as in makeMoE): loop over the experts, pick each one's
  tokens with a boolean mask. Slower, but the plainest way to read what dispatch does.

Expert parallelism swaps in a third, `AllToAllDispatch` (moe_core/parallel/experts.py), which sends the
rows to the processes that hold their experts.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn


class Dispatcher(Protocol):
    """What a MoE layer calls to run its experts on the tokens the router assigned to them."""

    def __call__(
        self,
        experts: nn.Module,
        x: torch.Tensor,
        weights: torch.Tensor,
        expert_idx: torch.Tensor,
        capacity: int | None,
        counts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """experts: the layer's; x: (N, C) tokens; weights, expert_idx: (N, k) each token's gates and
        experts; capacity: most assignments one expert takes (None: no limit); counts: (E,) assignments
        per expert, if counted already. Returns the combined output (N, C) and () assignments dropped."""
        ...


def count_per_expert(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) how many assignments each expert got. Not `torch.bincount`: on CUDA that reads the
    largest index back to the host, a sync that would stall every MoE layer."""
    flat = expert_idx.flatten()
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))


def sort_by_expert(
    weights: torch.Tensor,
    expert_idx: torch.Tensor,
    num_experts: int,
    capacity: int | None,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """The token->expert assignments (N, k) in expert order, after capacity: each one's token, expert
    and gate (M, 1); the assignments each expert keeps (E,), and how many were dropped ()."""
    flat_expert = expert_idx.flatten()  # (N*k,) token-major: token i's choices at i*k .. i*k+k-1
    # Stable sort keeps tokens in order within an expert, so capacity drops the latest tokens.
    order = torch.argsort(flat_expert, stable=True)
    counts = count_per_expert(flat_expert, num_experts) if counts is None else counts
    token, expert = order // expert_idx.shape[-1], flat_expert[order]
    gate = weights.flatten().index_select(0, order).unsqueeze(-1)
    dropped = torch.zeros((), device=weights.device, dtype=torch.long)
    if capacity is not None:
        # Position of each sorted assignment inside its expert's group; keep the first `capacity`.
        starts = torch.cumsum(counts, 0) - counts
        keep = torch.arange(order.numel(), device=weights.device) - starts[expert] < capacity
        dropped = (~keep).sum()
        token, expert, gate = token[keep], expert[keep], gate[keep]
        counts = counts.clamp(max=capacity)
    return token, expert, gate, counts, dropped


class LocalDispatch:
    """Every expert on this process, weights stacked (`StackedExperts`): sort the assignments by expert
    and run every expert on its contiguous slice of rows in one go."""

    def __call__(
        self,
        experts: nn.Module,
        x: torch.Tensor,
        weights: torch.Tensor,
        expert_idx: torch.Tensor,
        capacity: int | None,
        counts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dropped = torch.zeros((), device=x.device, dtype=torch.long)
        if x.shape[0] == 1 and capacity is None and x.device.type == "cpu":
            # One token (sampling with the KV cache): call its k experts directly, no sorting needed.
            # (Not on a GPU: reading the expert ids on the host is a sync, and the sorted path has none.)
            chosen = zip(expert_idx[0].tolist(), weights[0].unbind(), strict=True)
            return sum(gate * experts.one(e, x) for e, gate in chosen), dropped
        if x.shape[0] <= 64 and not experts.training and x.device.type != "cpu":
            # A few tokens on a GPU (one per sequence when sampling): run every expert on each and
            # zero the unchosen with the gates. A third of the sorted path's kernels, nothing to sort,
            # and the GPU reads every expert's weights in one pass either way.
            gates = torch.zeros(x.shape[0], len(experts), dtype=weights.dtype, device=x.device)
            return experts.every(x, gates.scatter_(1, expert_idx, weights)).to(x.dtype), dropped
        token, expert, gate, counts, dropped = sort_by_expert(weights, expert_idx, len(experts), capacity, counts)
        out = torch.zeros_like(x)
        rows = experts(x.index_select(0, token), expert, counts)
        return out.index_add_(0, token, rows * gate), dropped


class MaskedDispatch:
    """The textbook dispatch (makeMoE's), for experts in an `nn.ModuleList`: for each expert, a boolean
    mask over all tokens picks its rows. Same maths as `LocalDispatch`, one expert at a time."""

    def __call__(
        self,
        experts: nn.Module,
        x: torch.Tensor,
        weights: torch.Tensor,
        expert_idx: torch.Tensor,
        capacity: int | None,
        counts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.zeros_like(x)  # counts: not needed here
        dropped = torch.zeros((), device=x.device, dtype=torch.long)
        for e, expert in enumerate(experts):
            chosen = expert_idx == e  # (N, k): where token n picked expert e
            rows = chosen.any(dim=-1).nonzero().squeeze(-1)  # tokens routed to e, in order
            if capacity is not None and rows.numel() > capacity:
                dropped = dropped + rows.numel() - capacity
                rows = rows[:capacity]
            if rows.numel() == 0:
                continue
            gate = (weights * chosen).sum(dim=-1)[rows].unsqueeze(-1)
            out.index_add_(0, rows, expert(x[rows]) * gate)
        return out, dropped
