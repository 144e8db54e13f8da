"""A GPT-style character language model whose feed-forward layers are sparse MoE layers.

Pre-LayerNorm blocks, token embeddings with learned position embeddings (as in the seeds) or rotary
ones (RoPE), fused-QKV causal attention through `scaled_dot_product_attention`, and a KV cache for
fast sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_core.config import Config
from moe_core.model.dropout import Dropout
from moe_core.model.moe import MoE, ReferenceMoE, StackedExperts
from moe_core.model.token_step import TokenStep

# Prompts up to this long are fed to the KV cache one token at a time, through the one-token step
# (on a GPU, a replayed CUDA graph); longer ones are prefilled in one pass.
SHORT_PROMPT = 8


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None  # language-model cross-entropy, nats per character
    aux_loss: torch.Tensor  # load-balancing loss, averaged over layers
    z_loss: torch.Tensor  # router z-loss, averaged over layers


class KVCache:
    """Keys and values of the tokens seen so far, one preallocated buffer per layer.

    `length` (on the host) and `position` (the same count, on the model's device) say how many tokens
    are stored. A one-token step reads only `position`, so on a GPU it can be recorded once as a CUDA
    graph and replayed for every new token: nothing in it depends on a number held by the host.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        shape = (batch, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.length = 0
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)  # slot i holds the token at position i
        self.max_len = max_len

    def reset(self) -> None:
        self.length = 0
        self.position.zero_()

    def advance(self, tokens: int) -> None:
        self.length += tokens
        self.position.add_(tokens)


class Rotary(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021), as in Llama and Mixtral.

    Each pair of channels (i, i + D/2) of a query or key is rotated by an angle proportional to the
    token's position, so a query-key dot product depends only on how far apart the two tokens are.
    There is nothing to learn: attention can use position from the first step, where learned position
    embeddings must be trained first (char models then sit on the bigram plateau for ~150 steps).
    """

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        inv_freq = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq).repeat(1, 2)  # (T, D)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        """x: (..., T, D) at positions start .. start + T - 1; a tensor `start` is one token's position."""
        if isinstance(start, torch.Tensor):
            cos, sin = self.cos.index_select(0, start).to(x.dtype), self.sin.index_select(0, start).to(x.dtype)
        else:
            T = x.shape[-2]
            cos, sin = self.cos[start : start + T].to(x.dtype), self.sin[start : start + T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def make_rotary(config: Config) -> Rotary | None:
    return Rotary(config.head_dim, config.block_size) if config.pos_encoding == "rope" else None


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)  # one matmul for all heads' q, k, v
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.rotary = make_rotary(config)
        self.attn_dropout = Dropout(config.dropout)
        self.resid_dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        one_token = cache is not None and T == 1
        assert one_token or cache is None or cache.length == 0, "a prefill starts from an empty cache"
        position = cache.position if one_token else 0
        q, k, v = qkv
        if self.rotary is not None:  # queries and keys rotated together: half the kernels
            q, k = self.rotary(qkv[:2], position)
        causal, mask = True, None
        if one_token:  # write this token's key and value at its slot; attend to the filled slots
            cache.k[layer].index_copy_(2, position, k)
            cache.v[layer].index_copy_(2, position, v)
            k, v = cache.k[layer], cache.v[layer]
            causal, mask = False, (cache.slots <= position)[None]  # (1, slots): this one query row
        elif cache is not None:
            cache.k[layer][:, :, :T] = k
            cache.v[layer][:, :, :T] = v
        dropout = self.attn_dropout.p if self.training else 0.0
        if dropout > 0 and x.device.type == "cpu":
            # SDPA's CPU kernels cannot drop attention weights, so it would run these same steps
            # with nn.Dropout's slower mask. (CUDA's fused kernels can: they take the else branch.)
            scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5
            scores = scores + torch.full((T, T), float("-inf"), device=x.device).triu(1)
            y = self.attn_dropout(scores.softmax(dim=-1)) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class ReferenceAttention(nn.Module):
    """The seeds' attention: one Linear per head for each of q, k, v, and a masked softmax."""

    def __init__(self, config: Config):
        super().__init__()
        hs = config.head_dim
        self.keys = nn.ModuleList(nn.Linear(config.n_embd, hs, bias=False) for _ in range(config.n_head))
        self.queries = nn.ModuleList(nn.Linear(config.n_embd, hs, bias=False) for _ in range(config.n_head))
        self.values = nn.ModuleList(nn.Linear(config.n_embd, hs, bias=False) for _ in range(config.n_head))
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.rotary = make_rotary(config)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.register_buffer("tril", torch.tril(torch.ones(config.block_size, config.block_size)), persistent=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        assert cache is None, "the reference attention has no KV cache"
        T = x.shape[1]
        heads = []
        for key, query, value in zip(self.keys, self.queries, self.values):
            k, q, v = key(x), query(x), value(x)
            if self.rotary is not None:
                q, k = self.rotary(q), self.rotary(k)
            w = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5
            w = w.masked_fill(self.tril[:T, :T] == 0, float("-inf"))
            heads.append(self.attn_dropout(F.softmax(w, dim=-1)) @ v)
        return self.resid_dropout(self.proj(torch.cat(heads, dim=-1)))


class Block(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        reference = config.moe_impl == "reference"
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = (ReferenceAttention if reference else CausalSelfAttention)(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.moe = (ReferenceMoE if reference else MoE)(
            config.n_embd,
            config.num_experts,
            config.top_k,
            noisy=config.router == "noisy_topk",
            capacity_factor=config.capacity_factor,
            dropout=config.dropout,
        )

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.moe(self.ln2(x))


class MoETransformer(nn.Module):
    def __init__(self, config: Config, vocab_size: int):
        super().__init__()
        self.config, self.vocab_size = config, vocab_size
        self.tok_emb = nn.Embedding(vocab_size, config.n_embd)
        # Learned absolute positions, or none here: rotary ones are applied inside attention.
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.pos_encoding == "learned" else None
        self.drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        for moe in self.moe_layers():
            moe.router.noise_scale = config.router_noise
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, vocab_size)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            self._init_matrix(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, StackedExperts):  # each expert's matrices as if they were nn.Linear's
            for weight in (*module.w1, *module.w2):
                self._init_matrix(weight)
            nn.init.zeros_(module.b1)
            nn.init.zeros_(module.b2)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def _init_matrix(self, weight: torch.Tensor) -> None:
        """An (out, in) weight matrix."""
        init = self.config.init
        if init == "kaiming":  # the seeds' choice, suited to ReLU experts
            nn.init.kaiming_normal_(weight, nonlinearity="relu")
        elif init == "xavier":
            nn.init.xavier_uniform_(weight)
        else:  # GPT-2's N(0, 0.02)
            nn.init.normal_(weight, std=0.02)

    def moe_layers(self) -> list[MoE]:
        return [block.moe for block in self.blocks]

    def set_live(self, config: Config) -> None:
        """Take the settings a live run may change and the layers hold: dropout, expert capacity and
        router noise (moe_core/train/settings.py)."""
        self.config = config
        for module in self.modules():
            if isinstance(module, Dropout):
                module.set_rate(config.dropout)
            elif isinstance(module, nn.Dropout):
                module.p = config.dropout
        for moe in self.moe_layers():
            moe.capacity_factor = config.capacity_factor
            moe.router.noise_scale = config.router_noise

    def num_params(self) -> tuple[int, int]:
        """Total parameters, and those a token actually uses (its top-k experts, not all E)."""
        total = sum(p.numel() for p in self.parameters())
        per_expert = sum(p.numel() for p in self.blocks[0].moe.experts.parameters()) // self.config.num_experts
        idle = self.config.n_layer * (self.config.num_experts - self.config.top_k) * per_expert
        return total, total - idle

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 x active matmul weights + attention (PaLM appendix B)."""
        _, active = self.num_params()
        embeddings = self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        matmul = active - embeddings
        c = self.config
        return 6 * matmul + 12 * c.n_layer * c.n_embd * c.block_size

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> ModelOutput:
        T = idx.shape[1]
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            one_token = cache is not None and T == 1
            x = x + self.pos_emb(cache.position if one_token else torch.arange(T, device=idx.device))
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.advance(T)
        x = self.ln_f(x)
        if targets is None:
            logits = self.lm_head(x[:, -1:])  # sampling needs only the last position
            loss = None
        else:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        if self.training:
            layers = self.moe_layers()
            aux = torch.stack([m.aux_loss for m in layers]).mean()
            z = torch.stack([m.z_loss for m in layers]).mean()
        else:
            aux = z = torch.zeros((), device=idx.device)
        return ModelOutput(logits, loss, aux, z)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ):
        """Yield (B,) next-token tensors, one per step, continuing the prompt `idx` (B, T).

        Context is a window of at most block_size tokens. When it is full we keep its last half and
        start again from there, so the cache is refilled once per block_size/2 tokens rather than
        recomputed for every token. `use_cache=False` follows the same windows with full recompute,
        so greedy output is identical either way.
        """
        bs = self.config.block_size
        keep = max(1, bs // 2)
        window = idx[:, -bs:]
        step = self.token_step(idx.shape[0]) if use_cache else None
        refill = True  # the cache must be filled with the whole window
        for _ in range(max_new_tokens):
            if step is None:
                logits = self(window).logits[:, -1]
            elif refill:
                step.cache.reset()
                if window.shape[1] <= SHORT_PROMPT:  # token by token: replays beat a prefill's launches
                    for t in range(window.shape[1]):
                        logits = step(window[:, t : t + 1])
                else:
                    logits = self(window, cache=step.cache).logits[:, -1]
            else:
                logits = step(window[:, -1:])
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            yield nxt
            window, refill = torch.cat([window, nxt[:, None]], dim=1), False
            if window.shape[1] > bs:
                window, refill = window[:, -keep:], True

    def token_step(self, batch: int) -> TokenStep:
        """The one-token step for `batch` sequences, with its KV cache: made once per batch size and
        device and kept, so that a CUDA graph is recorded once, not at every sample."""
        p = next(self.parameters())
        key = (batch, p.device, p.dtype)
        steps = self.__dict__.setdefault("_token_steps", {})  # not a submodule, not in the state dict
        if key not in steps:
            c = self.config
            cache = KVCache(len(self.blocks), batch, c.n_head, c.block_size, c.head_dim, p.device, p.dtype)
            steps[key] = TokenStep(self, cache)
        return steps[key]


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick the next token from (B, V) logits; temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cum = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop tokens once the mass before them already reaches top_p (always keep the first).
        remove = cum - F.softmax(sorted_logits, dim=-1) >= top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def reference_generate(model: MoETransformer, idx: torch.Tensor, max_new_tokens: int):
    """The seeds' greedy loop: re-run the last block_size tokens for every new token (for bench)."""
    bs = model.config.block_size
    for _ in range(max_new_tokens):
        nxt = model(idx[:, -bs:]).logits[:, -1].argmax(-1)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        yield nxt
