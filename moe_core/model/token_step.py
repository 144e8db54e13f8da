"""One new token per sequence through the KV cache: the inner loop of sampling.

On a GPU a small model's token step is a few hundred tiny kernels, and launching them from Python
costs more than running them. So on CUDA the step is recorded once as a CUDA graph and replayed for
every later token: one launch instead of hundreds. It can be, because the step reads its position
from the cache's `position` tensor, never from a number on the host (see `KVCache`). Elsewhere, and
wherever recording fails, the step simply runs eagerly.
"""

from __future__ import annotations

import warnings

import torch


class TokenStep:
    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self.graph: torch.cuda.CUDAGraph | None = None
        self.use_graph = cache.position.device.type == "cuda"
        self.token = torch.zeros(cache.k[0].shape[0], 1, dtype=torch.long, device=cache.position.device)
        self.logits: torch.Tensor | None = None  # the graph's output buffer

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """token: (B, 1) -> logits (B, V) for the next one; the cache advances by one."""
        if not self.use_graph:
            return self._eager(token)
        if self.graph is None:
            return self._record(token)
        self.token.copy_(token)
        self.graph.replay()
        self.cache.length += 1  # the graph advanced `position` on the device; this is the host's copy
        return self.logits.clone()  # the next replay overwrites the buffer

    def _eager(self, token: torch.Tensor) -> torch.Tensor:
        return self.model(token, cache=self.cache).logits[:, -1]

    def _record(self, token: torch.Tensor) -> torch.Tensor:
        """Take this token's step eagerly on a side stream (warming up every kernel), then record
        the step once more as a graph: recording runs nothing, so the cache is not advanced twice."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            logits = self._eager(token)
        torch.cuda.current_stream().wait_stream(stream)
        length = self.cache.length
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.logits = self._eager(self.token)
        except RuntimeError as err:  # an op that cannot be recorded: sampling stays correct, only slower
            warnings.warn(f"sampling without a CUDA graph ({str(err).splitlines()[0]})", stacklevel=2)
            self.use_graph = False
        else:
            self.graph = graph
        self.cache.length = length
        return logits
