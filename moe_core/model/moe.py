"""The sparse Mixture-of-Experts feed-forward layer.

Each token is sent by a learned router to `top_k` of `num_experts` small MLPs; the layer's output is
the gate-weighted sum of those experts' outputs. The layer holds a router, its experts and a token
dispatcher (moe_core/model/dispatch.py), which gets each token to its experts and combines what they
return. Two layers share one router and one set of auxiliary losses:

* `MoE` (fast): the experts' weights are stacked into one tensor per layer (`StackedExperts`);
  `LocalDispatch` sorts the token->expert assignments by expert and runs all experts in one grouped
  matmul (each on its contiguous slice of rows), then scatters the results back with `index_add_`.
* `ReferenceMoE` (textbook, as in makeMoE): one `nn.Linear` pair per expert, and `MaskedDispatch`
  loops over the experts, picking each one's tokens with a boolean mask. Slower, but the clearest way
  to read what MoE does; the tests use it as the oracle. Its state dict converts to and from the
  stacked one on load.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_core.model.dispatch import Dispatcher, LocalDispatch, MaskedDispatch, count_per_expert
from moe_core.model.dropout import Dropout


class Expert(nn.Module):
    """One expert: the transformer MLP, C -> 4C -> C with ReLU (as in the seeds)."""

    def __init__(self, n_embd: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.relu(self.fc(x))))


class StackedExperts(nn.Module):
    """All E experts of a layer, with the weights of each kind stacked: w1 (E, 4C, C), b1 (E, 4C),
    w2 (E, C, 4C), b2 (E, C). Expert e computes the same as `Expert` with fc = (w1[e], b1[e]) and
    proj = (w2[e], b2[e]); stacking lets one grouped matmul run every expert on its own rows.
    """

    def __init__(self, num_experts: int, n_embd: int, dropout: float):
        super().__init__()
        E, C = num_experts, n_embd
        self.w1 = nn.Parameter(torch.empty(E, 4 * C, C))  # per expert, an nn.Linear's (out, in)
        self.b1 = nn.Parameter(torch.zeros(E, 4 * C))
        self.w2 = nn.Parameter(torch.empty(E, C, 4 * C))
        self.b2 = nn.Parameter(torch.zeros(E, C))
        self.dropout = Dropout(dropout)
        for w in (*self.w1, *self.w2):  # nn.Linear's default init, expert by expert
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))

    def __len__(self) -> int:
        """How many experts it holds (as `len` of an `nn.ModuleList` of them)."""
        return self.w1.shape[0]

    def forward(self, x: torch.Tensor, expert: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (M, C) rows sorted by expert; expert: (M,) each row's expert; counts: (E,) rows each."""
        dtype = grouped_mm_dtype(x, self.w1)
        if dtype is not None:
            # CUDA's grouped matmul takes bf16 only: cast here, as autocast does for nn.Linear.
            x, w1, b1, w2, b2 = (t.to(dtype) for t in (x, self.w1, self.b1, self.w2, self.b2))
            offs = counts.cumsum(0).to(torch.int32)  # stays on the device: no host sync
            if x.device.type != "cpu":
                # Biases through a one-hot (rows, E) matrix: a small matmul whose backward sums each
                # expert's rows in a GEMM. (On a GPU, the gather's backward adds every row into E
                # rows with atomics, all colliding: it was a fifth of the step.)
                one_hot = torch.zeros(x.shape[0], len(counts), dtype=dtype, device=x.device)
                one_hot.scatter_(1, expert[:, None], 1)
                bias1, bias2 = one_hot @ b1, one_hot @ b2
            else:  # index_select, not b1[expert]: its backward is a fast index_add, not an index_put
                bias1, bias2 = b1.index_select(0, expert), b2.index_select(0, expert)
            h = F.grouped_mm(x, w1.transpose(1, 2), offs=offs) + bias1
            y = F.grouped_mm(F.relu(h), w2.transpose(1, 2), offs=offs) + bias2
        else:  # one matmul per expert; unbind once, so the backward writes one weight gradient
            sizes = counts.tolist()  # the slice sizes must be read on the host: a sync on a GPU
            params = self.w1.unbind(), self.b1.unbind(), self.w2.unbind(), self.b2.unbind()
            parts = zip(x.split(sizes), *params, strict=True)
            y = torch.cat([F.linear(F.relu(F.linear(rows, w1, b1)), w2, b2) for rows, w1, b1, w2, b2 in parts])
        return self.dropout(y)

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e alone on x (N, C): the single-token sampling path (no gradient)."""
        return F.linear(F.relu(F.linear(x, self.w1[e], self.b1[e])), self.w2[e], self.b2[e])

    def every(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Every expert on every row of x (N, C), summed with `gates` (N, E), zero where not chosen."""
        dtype = grouped_mm_dtype(x, self.w1) or x.dtype  # the grouped path's precision, for equal results
        x, w1, b1, w2, b2 = (t.to(dtype) for t in (x, self.w1, self.b1, self.w2, self.b2))
        h = F.relu(torch.einsum("nc,ehc->enh", x, w1) + b1[:, None])
        y = torch.einsum("enh,ech->enc", h, w2) + b2[:, None]
        return torch.einsum("ne,enc->nc", gates.to(dtype), y)


def grouped_mm_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype | None:
    """The dtype `F.grouped_mm` will run the experts in here, or None for the per-expert loop.

    On CPU it takes float32 and bfloat16 with 16-byte-aligned rows, and torch.compile cannot trace
    it there. On CUDA it takes bfloat16 (Hopper and later; probed once per device), compiled or not.
    """
    if x.device.type == "cpu":
        ok = (
            not torch.compiler.is_compiling()
            and x.dtype == w.dtype in (torch.float32, torch.bfloat16)
            and _aligned(w, x.element_size())
            and _grouped_mm_runs("cpu", x.dtype)
        )
        return x.dtype if ok else None
    if x.device.type == "cuda" and _aligned(w, 2) and _grouped_mm_runs(str(x.device), torch.bfloat16):
        return torch.bfloat16
    return None


def _aligned(w: torch.Tensor, element_size: int) -> bool:
    return all(size * element_size % 16 == 0 for size in w.shape[1:])


@functools.cache
def _grouped_mm_runs(device: str, dtype: torch.dtype) -> bool:
    """Older torch releases (the project allows 2.2 on) have no `F.grouped_mm`; older GPUs lack its kernel."""
    if torch.compiler.is_compiling():  # a probe cannot run while tracing; the eager call answered already
        return True
    try:
        a = torch.ones(16, 16, device=device, dtype=dtype)
        b = torch.ones(2, 16, 16, device=device, dtype=dtype).transpose(1, 2)
        F.grouped_mm(a, b, offs=torch.tensor([8, 16], device=device, dtype=torch.int32))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


# Per-expert names in the reference's (and older checkpoints') state dict, and their stacked names.
_PER_EXPERT = {"fc.weight": "w1", "fc.bias": "b1", "proj.weight": "w2", "proj.bias": "b2"}


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
        self.noise_scale = 1.0  # config.router_noise: how much of the learned noise is added (0 = none)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, C) -> logits (N, E), gate weights (N, k), expert indices (N, k)."""
        logits = self.gate(x)
        if self.noise is not None and self.training and self.noise_scale > 0:
            noise = torch.randn_like(logits) * F.softplus(self.noise(x))
            logits = logits + (noise if self.noise_scale == 1.0 else noise * self.noise_scale)
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)
        return logits, F.softmax(top_logits, dim=-1, dtype=torch.float32).to(x.dtype), top_idx


@dataclass
class RoutingStats:
    """What the router did in one forward pass. Its figures are worked out when read (at a log
    line), not at every step: on a GPU each is a few more kernels to launch."""

    probs: torch.Tensor  # (N, E) the router's probabilities, detached
    expert_idx: torch.Tensor  # (N, k) the experts chosen
    dropped: torch.Tensor  # () assignments that found their expert full
    tokens_per_expert: torch.Tensor  # (E,) assignments routed to each expert, before capacity

    @property
    def entropy(self) -> torch.Tensor:
        """() mean entropy of the router's distribution per token, in nats."""
        return -(self.probs * self.probs.clamp_min(1e-9).log()).sum(-1).mean()

    @property
    def assignments(self) -> int:
        return self.expert_idx.numel()


def load_balancing_loss(
    probs: torch.Tensor, counts: torch.Tensor, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """Switch Transformer auxiliary loss: E * sum_e f_e * P_e.

    f_e is the fraction of token->expert assignments that went to expert e, P_e the mean router
    probability for e. It is 1.0 when routing is perfectly uniform and grows as load concentrates.
    With data parallelism `sum_over_ranks` makes f_e the global batch's: the loss is not linear in the
    batch, but with f_e global (it carries no gradient) each rank's loss is linear in its own P_e, so
    the mean of the ranks' gradients is exactly one process's gradient on the whole batch.
    probs: (N, E) the router's probabilities; counts: (E,) the assignments each expert got
    (`count_per_expert`).
    """
    counts = counts.to(probs.dtype)
    if sum_over_ranks is not None:
        counts = sum_over_ranks(counts)
    f = counts / counts.sum()
    p = probs.mean(dim=0)
    return len(counts) * torch.sum(f * p)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-sum-exp of the router logits; keeps them small and stable."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


class MoE(nn.Module):
    """Router + experts + token dispatcher. Input and output: (B, T, C)."""

    def __init__(
        self,
        n_embd: int,
        num_experts: int,
        top_k: int,
        noisy: bool = False,
        capacity_factor: float = 0.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor
        self.probe_capacity_factor = 0.0  # capacity when not training: none, unless a probe asks
        self.router = Router(n_embd, num_experts, top_k, noisy)
        self.experts = self.build_experts(n_embd, num_experts, dropout)
        # Runs the experts on the routed tokens; expert parallelism (moe_core/parallel/experts.py)
        # swaps in one that sends the tokens to the processes holding their experts.
        self.dispatcher: Dispatcher = self.build_dispatcher()
        self.register_load_state_dict_pre_hook(self.convert_expert_keys)
        # Filled by forward(): read by the trainer for losses and the dashboard's utilisation bars.
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.stats: RoutingStats | None = None
        # Set by data parallelism (moe_core/parallel/ranks.py): sums a tensor over all processes.
        self.sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None

    @staticmethod
    def build_experts(n_embd: int, num_experts: int, dropout: float) -> nn.Module:
        return StackedExperts(num_experts, n_embd, dropout)

    @staticmethod
    def build_dispatcher() -> Dispatcher:
        return LocalDispatch()

    @staticmethod
    def convert_expert_keys(module: MoE, state: dict, prefix: str, *_) -> None:
        """Load hook: per-expert keys (`experts.3.fc.weight`, as the reference layer and checkpoints
        saved before stacking have them) -> stacked ones (`experts.w1`)."""
        for old, new in _PER_EXPERT.items():
            keys = [f"{prefix}experts.{e}.{old}" for e in range(module.num_experts)]
            if all(k in state for k in keys):
                state[f"{prefix}experts.{new}"] = torch.stack([state.pop(k) for k in keys])

    def capacity(self, num_tokens: int) -> int | None:
        """Most assignments one expert may take: ceil(F * tokens * k / E); None = dropless.

        Capacity bounds the work per expert in a training batch. At inference it would make a
        token's output depend on how many tokens share the call (one when sampling with a KV cache),
        so evaluation and sampling are dropless, unless a probe asks what capacity costs there
        (`probe_capacity_factor`, set by moe_core/probe/intervene.py).
        """
        factor = self.capacity_factor if self.training else self.probe_capacity_factor
        if factor <= 0:
            return None
        return math.ceil(factor * num_tokens * self.top_k / self.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, expert_idx = self.router(x)
        if not self.training:  # losses and routing stats are for training; sampling skips their cost
            return self.dispatcher(self.experts, x, weights, expert_idx, self.capacity(x.shape[0]))[0].reshape(shape)

        counts = count_per_expert(expert_idx.flatten(), self.num_experts)  # once, for all three uses
        out, dropped = self.dispatcher(self.experts, x, weights, expert_idx, self.capacity(x.shape[0]), counts)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        self.aux_loss = load_balancing_loss(probs, counts, self.sum_over_ranks)
        self.z_loss = router_z_loss(logits)
        self.stats = RoutingStats(probs.detach(), expert_idx, dropped, counts)
        return out.reshape(shape)


class ReferenceMoE(MoE):
    """The seeds' layer: one `Expert` module each, dispatched with a boolean mask per expert
    (`MaskedDispatch`). Same weights, same maths."""

    @staticmethod
    def build_experts(n_embd: int, num_experts: int, dropout: float) -> nn.Module:
        return nn.ModuleList(Expert(n_embd, dropout) for _ in range(num_experts))

    @staticmethod
    def convert_expert_keys(module: MoE, state: dict, prefix: str, *_) -> None:
        """Load hook: stacked keys (`experts.w1`) -> per-expert ones (`experts.3.fc.weight`)."""
        for old, new in _PER_EXPERT.items():
            for e, tensor in enumerate(state.pop(f"{prefix}experts.{new}", ())):
                state[f"{prefix}experts.{e}.{old}"] = tensor

    @staticmethod
    def build_dispatcher() -> Dispatcher:
        return MaskedDispatch()
