"""Switching experts off, forcing top-1, changing capacity: a model changed for the length of a `with`.

    with intervened(model, Intervention(masked=((0, 3),), top_k=1)):
        model(x)          # layer 1's router picks among experts 0-2 and 4-7, one each

A masked expert's router logit is set to -inf by a forward hook on the router's gate, so top-k picks
among the others (in the fast and the reference layer alike: both route through the same `Router`).
The hooks and the changed attributes are gone when the block ends: training never runs this code.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from moe_core.probe.request import Intervention


@contextmanager
def intervened(model, intervention: Intervention) -> Iterator[None]:
    """The model with `intervention` applied inside the block, exactly as it was after."""
    layers = model.moe_layers()
    intervention.check(len(layers), layers[0].num_experts, layers[0].top_k)
    saved = [(m.top_k, m.router.top_k, m.probe_capacity_factor) for m in layers]
    token_steps = model.__dict__.pop("_token_steps", None)  # a CUDA graph recorded without the hooks
    handles = []
    try:
        for i, moe in enumerate(layers):
            off = [e for layer, e in intervention.masked if layer == i]
            if off:
                minus_inf = torch.zeros(moe.num_experts, device=moe.router.gate.weight.device)  # no copy per call
                minus_inf[off] = float("-inf")
                handles.append(moe.router.gate.register_forward_hook(_add(minus_inf)))
            if intervention.top_k is not None:
                moe.top_k = moe.router.top_k = intervention.top_k
            if intervention.capacity_factor is not None:
                moe.probe_capacity_factor = intervention.capacity_factor
        yield
    finally:
        for handle in handles:
            handle.remove()
        for moe, (k, router_k, factor) in zip(layers, saved):
            moe.top_k, moe.router.top_k, moe.probe_capacity_factor = k, router_k, factor
        model.__dict__.pop("_token_steps", None)
        if token_steps is not None:
            model.__dict__["_token_steps"] = token_steps


def _add(bias: torch.Tensor):
    def hook(module, inputs, logits: torch.Tensor) -> torch.Tensor:
        return logits + bias.to(logits.dtype)

    return hook
