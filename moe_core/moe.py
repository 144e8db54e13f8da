"""The sparse Mixture-of-Experts feed-forward layer.

Each token is sent by a learned router to `top_k` of `num_experts` small MLPs; the layer's output is
the gate-weighted sum of those experts' outputs. Two dispatch strategies share one router, one set
of experts and one set of auxiliary losses:

* `MoE` (fast): sort the token->expert assignments by expert, run each expert once on a contiguous
  slice, and scatter the results back with `index_add_`.
* `ReferenceMoE` (textbook, as in makeMoE): loop over experts, pick each one's tokens with a boolean
  mask. Slower, but the clearest way to read what MoE does; the tests use it as the oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class Expert(nn.Module):
    """One expert: the transformer MLP, C -> 4C -> C with ReLU (as in the seeds)."""

    def __init__(self, n_embd: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.relu(self.fc(x))))


class Router(nn.Module):
    """Top-k gating (Shazeer et al. 2017), optionally with learned noise during training.

    Gate weights are a softmax over the k selected logits, as in the seeds and Mixtral.
    """

    def __init__(self, n_embd: int, num_experts: int, top_k: int, noisy: bool):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(n_embd, num_experts, bias=False)
        # Noise scale softplus(W_noise x) lets the model learn how much to explore per token.
        self.noise = nn.Linear(n_embd, num_experts, bias=False) if noisy else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, C) -> logits (N, E), gate weights (N, k), expert indices (N, k)."""
        logits = self.gate(x)
        if self.noise is not None and self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(x))
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)
        return logits, F.softmax(top_logits, dim=-1, dtype=torch.float32).to(x.dtype), top_idx


@dataclass
class RoutingStats:
    """What the router did in one forward pass (tensors: no host sync until someone reads them)."""

    tokens_per_expert: torch.Tensor  # (E,) assignments routed to each expert, before capacity
    dropped: torch.Tensor  # () assignments that found their expert full
    entropy: torch.Tensor  # () mean entropy of the router's distribution per token, in nats
    assignments: int  # tokens * top_k


def load_balancing_loss(probs: torch.Tensor, expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss: E * sum_e f_e * P_e.

    f_e is the fraction of token->expert assignments that went to expert e, P_e the mean router
    probability for e. It is 1.0 when routing is perfectly uniform and grows as load concentrates.
    """
    counts = torch.bincount(expert_idx.flatten(), minlength=num_experts).to(probs.dtype)
    f = counts / expert_idx.numel()
    p = probs.mean(dim=0)
    return num_experts * torch.sum(f * p)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-sum-exp of the router logits; keeps them small and stable."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


class MoE(nn.Module):
    """Router + experts + vectorised dispatch. Input and output: (B, T, C)."""

    def __init__(self, n_embd: int, num_experts: int, top_k: int, noisy: bool = False,
                 capacity_factor: float = 0.0, dropout: float = 0.0):
        super().__init__()
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor
        self.router = Router(n_embd, num_experts, top_k, noisy)
        self.experts = nn.ModuleList(Expert(n_embd, dropout) for _ in range(num_experts))
        # Filled by forward(): read by the trainer for losses and the dashboard's utilisation bars.
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.stats: RoutingStats | None = None

    def capacity(self, num_tokens: int) -> int | None:
        """Most assignments one expert may take: ceil(F * tokens * k / E); None = dropless.

        Capacity bounds the work per expert in a training batch. At inference it would make a
        token's output depend on how many tokens share the call (one when sampling with a KV cache),
        so evaluation and sampling are always dropless.
        """
        if self.capacity_factor <= 0 or not self.training:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, expert_idx = self.router(x)
        out, dropped = self.dispatch(x, weights, expert_idx, self.capacity(x.shape[0]))
        if not self.training:  # losses and routing stats are for training; sampling skips their cost
            return out.reshape(shape)

        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        self.aux_loss = load_balancing_loss(probs, expert_idx, self.num_experts)
        self.z_loss = router_z_loss(logits)
        with torch.no_grad():
            entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()
            counts = torch.bincount(expert_idx.flatten(), minlength=self.num_experts)
        self.stats = RoutingStats(counts, dropped, entropy, expert_idx.numel())
        return out.reshape(shape)

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, expert_idx: torch.Tensor,
                 capacity: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sort assignments by expert so each expert runs once on a contiguous slice.

        Returns the combined output (N, C) and the number of assignments dropped by capacity.
        """
        dropped = torch.zeros((), device=x.device, dtype=torch.long)
        if x.shape[0] == 1 and capacity is None:
            # One token (sampling with the KV cache): call its k experts directly, no sorting needed.
            chosen = zip(expert_idx[0].tolist(), weights[0].unbind())
            return sum(gate * self.experts[e](x) for e, gate in chosen), dropped
        flat_expert = expert_idx.flatten()  # (N*k,) token-major: token i's choices at i*k .. i*k+k-1
        # Stable sort keeps tokens in order within an expert, so capacity drops the latest tokens.
        order = torch.argsort(flat_expert, stable=True)
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        token = order // self.top_k
        gate = weights.flatten()[order].unsqueeze(-1)

        if capacity is not None:
            # Position of each sorted assignment inside its expert's group; keep the first `capacity`.
            starts = torch.cumsum(counts, 0) - counts
            position = torch.arange(order.numel(), device=x.device) - starts[flat_expert[order]]
            keep = position < capacity
            dropped = (~keep).sum()
            token, gate = token[keep], gate[keep]
            counts_kept = counts.clamp(max=capacity)
        else:
            counts_kept = counts

        out = torch.zeros_like(x)
        inputs = x[token]
        # The split sizes must live on the host: one sync per layer, the price of ragged slices.
        chunks = inputs.split(counts_kept.tolist())
        outputs = [expert(chunk) for expert, chunk in zip(self.experts, chunks) if chunk.shape[0] > 0]
        if outputs:
            out.index_add_(0, token, torch.cat(outputs) * gate)
        return out, dropped


class ReferenceMoE(MoE):
    """The seeds' dispatch: for each expert, a boolean mask over all tokens. Same weights, same maths."""

    def dispatch(self, x, weights, expert_idx, capacity):
        out = torch.zeros_like(x)
        dropped = torch.zeros((), device=x.device, dtype=torch.long)
        for e, expert in enumerate(self.experts):
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
