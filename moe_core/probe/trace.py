"""Route any text through a model: for each character and layer, the experts chosen and their gate
weights, and the model's loss on the character.

A text longer than the model's context is read in windows of `block_size` that overlap by half, each
character taken from the window that gives it the most context (the earliest that holds it: at least
half a block, except at the start). Routing depends on context too (attention runs before each router),
so a character's experts and its loss (the logits one position before it) come from the same window.
All windows go through the model in one batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_core.data.vocab import Vocab
from moe_core.errors import UserError
from moe_core.model.routes import recording_routes

MAX_PROBE_CHARS = 100_000  # a book chapter; the answer holds a few numbers per character and layer


@torch.no_grad()
def trace_text(model, vocab: Vocab, text: str) -> dict:
    """{"text", "experts": [layer][char] -> [k experts], "gates": [layer][char] -> [k weights],
    "loss": [char] -> nats (None for the first: nothing predicts it)}."""
    if not text:
        raise UserError("the text to probe is empty; give at least one character (--text or --file)")
    if len(text) > MAX_PROBE_CHARS:
        raise UserError(f"the text to probe has {len(text):,} characters; give at most {MAX_PROBE_CHARS:,}")
    unknown = sorted(set(text) - set(vocab.chars))
    if unknown:
        raise UserError(
            f"the text has characters the model never saw: {''.join(unknown)[:40]!r}; "
            "probe text from the run's own corpus (--text, --file), or remove them"
        )
    ids = torch.tensor(vocab.encode(text), dtype=torch.long)
    T = model.config.block_size
    starts, owner = windows(len(ids), T)
    device = next(model.parameters()).device
    batch = torch.stack([ids[s : s + min(T, len(ids))] for s in starts]).to(device)
    was_training = model.training
    model.eval()
    try:
        with recording_routes(model) as noted:
            hidden = model(batch, targets=batch).logits  # targets only to get every position's logits
    finally:
        model.train(was_training)
    width = batch.shape[1]
    # Position p of the text is row owner[p], column p - starts[owner[p]]; the logits that predict it sit
    # one column before, in the same row (never before its start: an owner holds half a block before p).
    rows = torch.tensor(owner)
    flat = (rows * width + torch.arange(len(ids)) - torch.tensor(starts)[rows]).to(device)
    logits = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat[1:] - 1).float()
    losses = F.cross_entropy(logits, ids[1:].to(device), reduction="none").tolist()
    experts, gates = [], []
    for layer in noted:
        weights, idx = layer[0]  # (windows * width, k)
        experts.append(idx.index_select(0, flat).tolist())
        gates.append([[round(g, 4) for g in row] for row in weights.float().index_select(0, flat).tolist()])
    return {"text": text, "experts": experts, "gates": gates, "loss": [None, *losses]}


def windows(n: int, block: int) -> tuple[list[int], list[int]]:
    """Window starts covering n positions, and for each position the window it is read in."""
    if n <= block:
        return [0], [0] * n
    half = max(1, block // 2)
    starts = list(range(0, n - block + 1, half))
    if starts[-1] + block < n:
        starts.append(n - block)
    owner, w = [], 0
    for p in range(n):
        while starts[w] + block <= p:  # the earliest window that holds p: the most context before it
            w += 1
        owner.append(w)
    return starts, owner


def first_experts(model, vocab: Vocab, text: str) -> list[list[int]]:
    """Per layer, the first expert each character of `text` goes to: what a sample records, so that the
    dashboard can colour it."""
    return [[chosen[0] for chosen in layer] for layer in trace_text(model, vocab, text)["experts"]]
