"""Dropout with a cheaper random mask on CPU.

`nn.Dropout` on CPU draws one random float per element through `bernoulli_`, which costs about 40
multiplies per element: at the seeds' dropout of 0.1 that was an eighth of a training step. Here
each element gets 15 random bits instead, four elements to one 64-bit draw, about 3x faster.

The drop probability is rounded to a multiple of 1/32768 (0.1 becomes 0.100006), and kept elements
are scaled by 1 / (1 - that probability), so the expected output equals the input, as in
`nn.Dropout`. The draws come from torch's global generator, so checkpoints resume the same masks.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_LEVELS = 1 << 15  # random values per element: 0 .. 32767


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.set_rate(p)

    def set_rate(self, p: float) -> None:
        """The drop probability, also between two steps of a live run (`moe-tui set RUN dropout=...`)."""
        self.p = p
        self.threshold = round(p * _LEVELS)  # values below it are dropped
        self.scale = 1.0 / (1.0 - self.threshold / _LEVELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        if x.device.type != "cpu":  # CUDA's own dropout kernel is fused and fast
            return F.dropout(x, self.p, training=True)
        n = x.numel()
        # random_() on int64 fills bits 0..62; each 16-bit lane, masked to its low 15, is uniform.
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_()
        values = words.view(torch.int16)[:n].view(x.shape) & (_LEVELS - 1)
        return torch.where(values >= self.threshold, x * self.scale, 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}"
