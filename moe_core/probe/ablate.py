"""What each expert is worth, measured on the fixed evaluation batches (the ones a training run's
validation loss is computed on, so the figures compare with its curve):

* `val_loss`: the validation loss, with or without an `Intervention`;
* `importance`: per layer, how much the validation loss rises when each expert alone is switched off;
* `similarity`: per layer, the cosine similarity of the experts' outputs on the same tokens.

Similarity compares outputs, not weights: two experts can compute the same function with their hidden
units in another order, and weights would call them different. It is the plain cosine of what each
expert adds to the residual stream for the same inputs, not CKA: CKA ignores rotations, but an expert
whose output is another's rotated writes something else into the residual stream, so it is not redundant.

All of it runs in inference mode (no autograd bookkeeping): nothing here is trained, and no tensor made here
outlives the call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moe_core.data.batches import evaluation_batches
from moe_core.model.moe import StackedExperts
from moe_core.probe.intervene import intervened
from moe_core.probe.request import Intervention

SIMILARITY_TOKENS = 4096  # enough for a stable cosine, few enough to run every expert on them


CHUNK_TOKENS = 8_192  # evaluation batches run this many tokens at a time: larger matmuls (past this, slower on 2 cores)


class EvalSet:
    """The validation split's fixed evaluation batches, drawn once and kept on the model's device; run
    in chunks of several batches (the mean over all their tokens is the mean of the batches' means:
    they are of one size)."""

    def __init__(self, val_ids: torch.Tensor, config, device: torch.device | str):
        batches = evaluation_batches(val_ids, config, split=1)
        self.batches = [batches.next(device) for _ in range(config.eval_iters)]
        per_chunk = max(1, CHUNK_TOKENS // self.batches[0][0].numel())
        self.chunks = [
            (torch.cat([x for x, _ in group]), torch.cat([y for _, y in group]))
            for group in (self.batches[i : i + per_chunk] for i in range(0, len(self.batches), per_chunk))
        ]
        self.tokens = sum(y.numel() for _, y in self.chunks)


@torch.inference_mode()
def val_loss(model, evals: EvalSet, intervention: Intervention | None = None) -> float:
    """The mean validation loss over the fixed batches, as the trainer's evaluation computes it."""
    was_training = model.training
    model.eval()
    try:
        change = intervention or Intervention()
        # A capacity is per forward call: measured on the batches as training has them, not on chunks.
        runs = evals.batches if change.capacity_factor is not None else evals.chunks
        with intervened(model, change):
            total = sum(model(x, y).loss.item() * y.numel() for x, y in runs)
    finally:
        model.train(was_training)
    return total / evals.tokens


def maskable(model) -> bool:
    """Whether one expert can be switched off: the others must still fill each token's top-k."""
    moe = model.moe_layers()[0]
    return moe.num_experts - 1 >= moe.top_k


@torch.inference_mode()
def importance(model, evals: EvalSet) -> tuple[float, list[list[float]]]:
    """The validation loss, and per layer and expert how much it rises with that expert alone off.

    Exact, and cheaper than a full evaluation per expert. Switching off an expert of layer l changes
    nothing below it, nor that layer's attention, nor the MoE output of a token the expert did not take:
    so each expert's pass starts from the unchanged model's layer l, runs the MoE again on that expert's
    tokens alone, and only the layers above in full. (A block is x + attn(ln1(x)), then + moe(ln2(.)).)
    """
    was_training = model.training
    model.eval()
    blocks, experts = model.blocks, model.moe_layers()[0].num_experts
    try:
        inputs = [_embedded(model, x) for x, _ in evals.chunks]  # what enters block 0
        losses = []
        for layer, block in enumerate(blocks):
            attended = [x + block.attn(block.ln1(x), None, layer) for x in inputs]
            normed = [block.ln2(h).reshape(-1, h.shape[-1]) for h in attended]
            chosen = [block.moe.router(z)[2] for z in normed]  # (tokens, k) each token's experts
            moe_out = [block.moe(z) for z in normed]
            row = []
            for e in range(experts):
                with intervened(model, Intervention(masked=((layer, e),))):
                    changed = []
                    for h, z, idx, out in zip(attended, normed, chosen, moe_out):
                        took = (idx == e).any(dim=-1)  # the tokens whose output changes
                        out = out.clone()
                        out[took] = block.moe(z[took])
                        changed.append(h + out.reshape(h.shape))
                    row.append(_mean_loss(model, changed, layer + 1, evals))
            losses.append(row)
            inputs = [h + out.reshape(h.shape) for h, out in zip(attended, moe_out)]  # the next layer's inputs
        base = _mean_loss(model, inputs, len(blocks), evals)  # the last block's outputs, unchanged
    finally:
        model.train(was_training)
    return base, [[loss - base for loss in row] for row in losses]


class _Caught(Exception):
    """Raised by the hook of `_embedded`: what it wanted has been computed, the rest of the pass is not needed."""


def _embedded(model, idx: torch.Tensor) -> torch.Tensor:
    """The input of the first block, as the model's own forward computes it: caught by a hook, which then
    stops the pass there."""
    caught = []

    def catch(module, args) -> None:
        caught.append(args[0])
        raise _Caught

    handle = model.blocks[0].register_forward_pre_hook(catch)
    try:
        model(idx)
    except _Caught:
        pass
    finally:
        handle.remove()
    return caught[0]


def _mean_loss(model, inputs: list[torch.Tensor], first: int, evals: EvalSet) -> float:
    """The validation loss with blocks `first`.. run on `inputs` (the model's forward from there on)."""
    total = 0.0
    for x, (_, y) in zip(inputs, evals.chunks):
        for i in range(first, len(model.blocks)):
            x = model.blocks[i](x, None, i)
        logits = model.lm_head(model.ln_f(x))
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
    return total / evals.tokens


@torch.inference_mode()
def similarity(model, evals: EvalSet) -> list[list[list[float]]]:
    """Per layer, (E, E) cosine similarity of the experts' outputs on the same evaluation tokens."""
    layers = model.moe_layers()
    caught: list[torch.Tensor] = []
    handles = [moe.register_forward_pre_hook(lambda module, args: caught.append(args[0])) for moe in layers]
    was_training = model.training
    model.eval()
    try:
        x, _ = evals.chunks[0]
        model(x[: max(1, math.ceil(SIMILARITY_TOKENS / x.shape[1]))])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    tables = []
    for moe, tokens in zip(layers, caught):
        tokens = tokens.reshape(-1, tokens.shape[-1])[:SIMILARITY_TOKENS]
        outputs = torch.stack([_one_expert(moe.experts, e, tokens).flatten().float() for e in range(moe.num_experts)])
        unit = F.normalize(outputs, dim=1)
        tables.append((unit @ unit.T).clamp(-1, 1).tolist())
    return tables


def _one_expert(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e on x, in the fast layer's stacked weights or the reference layer's modules."""
    return experts.one(e, x) if isinstance(experts, StackedExperts) else experts[e](x)
