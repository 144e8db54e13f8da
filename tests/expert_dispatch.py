"""What each rank of a two-process group spawned by tests/test_distributed.py computes, in a module of its own
so that the spawned processes import torch and the engine only, not the test suite."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_core.config import Config
from moe_core.model.moe import MoE
from moe_core.optim import AdamW
from moe_core.parallel.experts import ExpertParallel
from moe_core.parallel.ranks import Ranks

CAPACITY_FACTORS = {"dropless": 0.0, "capacity": 1.0}


def dispatch_on_two_ranks(rank: int, init: str, results: str) -> None:
    """One rank of the expert-parallel dispatch test: each capacity factor in the one process group
    (starting processes is what costs here)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    for name, capacity_factor in CAPACITY_FACTORS.items():
        dispatch_once(rank, capacity_factor, f"{results}-{name}")
    dist.destroy_process_group()


def dispatch_once(rank: int, capacity_factor: float, results: str) -> None:
    torch.manual_seed(0)  # the same layer on both ranks
    # 6 channels: rows too narrow for the grouped matmul, so the experts run as per-expert F.linear,
    # which autocast turns to bf16, as CUDA's grouped matmul always is.
    layer = MoE(6, num_experts=4, top_k=2, capacity_factor=capacity_factor)
    whole = MoE(6, num_experts=4, top_k=2, capacity_factor=capacity_factor)
    whole.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(rank))  # each rank its own tokens
    holder = torch.nn.Module()
    holder.moe = layer
    ExpertParallel(
        Ranks(rank, 2),
        Config(num_experts=4, top_k=2, n_embd=6, n_head=1),
        holder,
        AdamW([{"params": holder.parameters()}], lr=1e-3),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        split, alone = layer(x), whole(x)
    split.sum().backward()
    alone.sum().backward()
    torch.save(
        {
            "split": split.detach(),
            "alone": alone.detach(),
            "dtype": str(split.dtype),
            "grad": layer.experts.w1.grad,
            "whole_grad": whole.experts.w1.grad,
        },
        f"{results}-{rank}.pt",
    )
