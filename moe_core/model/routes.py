"""Which experts each token went to: the routers' choices recorded, and counted per layer.

    counter = RouteCounter(model, vocab_size)
    with counter.recording():
        model(x)                      # any number of forward passes (evaluation batches)
        counter.add(x)                # after each: pairs x's characters with the experts chosen
    counter.counts                    # (layers, vocab, experts) int64: which characters each expert took
    counter.pairs                     # (layers, experts, experts) int64: which experts were picked together

Recording hooks each layer's router only while inside `recording()`, so training and sampling pay
nothing. moe_core/routing.py reads the counts (lift, mutual information, co-activation).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F


@contextmanager
def recording_routes(model) -> Iterator[list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    """While inside, each forward pass appends, per layer, the router's (gates, experts), each (tokens, k)."""
    layers = model.moe_layers()
    noted: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in layers]

    def hook(layer: int):
        def note(module, inputs, output) -> None:
            noted[layer].append((output[1].detach(), output[2].detach()))

        return note

    handles = [layer.router.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield noted
    finally:
        for handle in handles:
            handle.remove()


class RouteCounter:
    def __init__(self, model, vocab_size: int):
        self.model = model
        self.num_experts = model.moe_layers()[0].num_experts
        layers, experts = len(model.moe_layers()), self.num_experts
        # Counted where the model runs: on a GPU, reading each batch's choices back would be a sync.
        device = next(model.parameters()).device
        self.counts = torch.zeros(layers, vocab_size, experts, dtype=torch.long, device=device)
        self.pairs = torch.zeros(layers, experts, experts, dtype=torch.long, device=device)
        self._noted: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(layers)]

    @contextmanager
    def recording(self) -> Iterator[None]:
        """While inside, every forward pass notes each layer's chosen experts (the router's top-k)."""
        with recording_routes(self.model) as noted:
            self._noted = noted
            yield

    def add(self, x: torch.Tensor) -> None:
        """Count the passes noted since the last call, whose input characters were `x` (B, T)."""
        chars = x.reshape(-1).to(self.counts.device)
        experts = self.num_experts
        for layer, noted in enumerate(self._noted):
            for _, idx in noted:
                k = idx.shape[-1]
                pairs = chars.repeat_interleave(k) * experts + idx.reshape(-1).to(chars.device)
                self.counts[layer].view(-1).index_add_(0, pairs, torch.ones_like(pairs))
                # (tokens, E): 1 where chosen; float, as GPUs multiply no integers (exact below 2**24)
                picked = F.one_hot(idx.reshape(-1, k), experts).sum(dim=1).float()
                self.pairs[layer] += (picked.T @ picked).long()
            noted.clear()
