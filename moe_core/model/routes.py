"""Which characters each expert takes: routing decisions counted per layer x character x expert.

    counter = RouteCounter(model, vocab_size)
    with counter.recording():
        model(x)                      # any number of forward passes (evaluation batches)
    counter.add(x)                    # after each: pairs x's characters with the experts chosen
    counter.counts                    # (layers, vocab, experts) int64

Recording hooks each layer's router only while inside `recording()`, so training and sampling pay
nothing. `lift` and `top_characters` read the counts the way a person learning MoE asks the
question: which characters does this expert take more often than its share?
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from moe_core.events import ExpertChars


class RouteCounter:
    def __init__(self, model, vocab_size: int):
        self.layers = model.moe_layers()
        self.num_experts = self.layers[0].num_experts
        # Counted where the model runs: on a GPU, reading each batch's choices back would be a sync.
        device = next(model.parameters()).device
        self.counts = torch.zeros(len(self.layers), vocab_size, self.num_experts, dtype=torch.long, device=device)
        self._chosen: list[list[torch.Tensor]] = [[] for _ in self.layers]

    @contextmanager
    def recording(self) -> Iterator[None]:
        """While inside, every forward pass notes each layer's chosen experts (the router's top-k)."""
        handles = [layer.router.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, layer: int):
        def note(module, inputs, output) -> None:
            self._chosen[layer].append(output[2].detach())  # (tokens, k) expert indices

        return note

    def add(self, x: torch.Tensor) -> None:
        """Count the passes noted since the last call, whose input characters were `x` (B, T)."""
        chars = x.reshape(-1).to(self.counts.device)
        experts = self.num_experts
        for layer, chosen in enumerate(self._chosen):
            for idx in chosen:
                k = idx.shape[-1]
                pairs = chars.repeat_interleave(k) * experts + idx.reshape(-1).to(chars.device)
                self.counts[layer].view(-1).index_add_(0, pairs, torch.ones_like(pairs))
            chosen.clear()


def lift(counts: torch.Tensor) -> torch.Tensor:
    """(V, E) counts of one layer -> (V, E) lift: the share of a character's routings that go to an
    expert, over that expert's share of all routings (1 = no preference; 0 where a character is unseen)."""
    counts = counts.double()
    per_char = counts.sum(dim=1, keepdim=True)
    expert_share = counts.sum(dim=0, keepdim=True) / counts.sum().clamp_min(1)
    return torch.where(per_char > 0, counts / per_char.clamp_min(1) / expert_share.clamp_min(1e-12), 0.0)


def top_characters(
    counts: torch.Tensor, chars: str, expert: int, n: int = 8, min_share: float = 0.001
) -> list[tuple[str, float]]:
    """The `n` characters with the highest lift for `expert` in one layer's (V, E) counts, leaving
    out characters rarer than `min_share` of the text (their lift is noise)."""
    frequent = counts.sum(dim=1) >= min_share * counts.sum()
    scores = torch.where(frequent, lift(counts)[:, expert], -1.0)
    best = scores.argsort(descending=True)[:n]
    return [(chars[i], float(scores[i])) for i in best.tolist() if scores[i] > 0]


def mutual_information(counts: torch.Tensor) -> float:
    """I(character; expert) in nats from one layer's (V, E) counts: how much the character says
    about the expert chosen (0 = nothing; at most ln E)."""
    p = counts.double() / counts.sum().clamp_min(1)
    outer = p.sum(dim=1, keepdim=True) * p.sum(dim=0, keepdim=True)
    mask = p > 0
    return float((p[mask] * (p[mask] / outer[mask]).log()).sum())


def shown(char: str) -> str:
    """A character as a person can see it: spaces, newlines and tabs named."""
    return {" ": "␣", "\n": "⏎", "\t": "⇥"}.get(char, char)


def routing_change(before: torch.Tensor, after: torch.Tensor) -> float:
    """How much one layer's picture moved between two evaluations: the total variation distance
    between each character's distribution over experts then and now, averaged with the characters'
    frequencies (0 = the same routing; 1 = every character now goes to other experts)."""

    def per_char(counts: torch.Tensor) -> torch.Tensor:
        counts = counts.double()
        return counts / counts.sum(dim=1, keepdim=True).clamp_min(1)

    weight = after.double().sum(dim=1)
    distance = 0.5 * (per_char(before) - per_char(after)).abs().sum(dim=1)
    return float((distance * weight).sum() / weight.sum().clamp_min(1))


def routes_at_checkpoint(run, which: str, data_dir) -> "ExpertChars":
    """Which characters each expert takes in a saved model, counted on the validation batches the
    trainer evaluates on (so, for `best`, the same counts its evaluation logged)."""
    from moe_core.data.batches import evaluation_batches, split_ids, token_ids
    from moe_core.data.corpus import load_corpus
    from moe_core.events import ExpertChars
    from moe_core.model.sampling import load_model

    model, vocab, step = load_model(run, which, "cpu")
    model.eval()
    config = run.load_config()
    corpus = load_corpus(config.dataset, data_dir, columns=config.columns, encoding=config.encoding)
    ids = token_ids(vocab, corpus.text)
    _, val = split_ids(ids, config.val_fraction)
    batches = evaluation_batches(val, config, split=1)
    counter = RouteCounter(model, len(vocab))
    with torch.no_grad(), counter.recording():
        for _ in range(config.eval_iters):
            x, y = batches.next("cpu")
            model(x, y)
            counter.add(x)
    return ExpertChars(step, "".join(vocab.chars), counter.counts.tolist())
