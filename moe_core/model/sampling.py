"""Text generation from a trained model: the one path used by the trainer, the CLI and the dashboard."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from moe_core.config import resolve_device
from moe_core.data.vocab import Vocab
from moe_core.errors import UserError
from moe_core.model.request import SampleRequest
from moe_core.model.transformer import MoETransformer
from moe_core.store.checkpoint import load_checkpoint
from moe_core.store.runs import Run


@torch.no_grad()
def generate_text(
    model: MoETransformer, vocab: Vocab, request: SampleRequest, default_seed: int = 0
) -> Iterator[list[str]]:
    """Yield, one step at a time, the next character of each of the `num_samples` texts.

    The prompt itself is not yielded; callers print it first. Uses its own RNG, so sampling in the
    middle of training leaves the training run's random stream untouched.
    """
    request.check()
    ids = vocab.encode(request.prompt)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seed = request.seed if request.seed is not None else default_seed
    generator = torch.Generator(device).manual_seed(seed)
    idx = torch.tensor([ids] * request.num_samples, device=device)
    try:
        for nxt in model.generate(
            idx, request.max_new_tokens, request.temperature, request.top_k, request.top_p, generator
        ):
            yield [vocab.chars[i] for i in nxt.tolist()]
    finally:
        model.train(was_training)


def complete(model: MoETransformer, vocab: Vocab, request: SampleRequest, default_seed: int = 0) -> list[str]:
    """The whole texts at once, each starting with the prompt."""
    texts = [request.prompt] * request.num_samples
    for chars in generate_text(model, vocab, request, default_seed):
        texts = [t + ch for t, ch in zip(texts, chars)]
    return texts


def load_model(
    run: Run, which: str = "latest", device: str = "auto", on_skip: Callable[[str], None] | None = None
) -> tuple[MoETransformer, Vocab, int]:
    """A run's model from its `latest` or `best` checkpoint, ready to sample; also the checkpoint step.
    `on_skip` hears of corrupt newer checkpoints passed over."""
    folder = run.checkpoint(which, on_skip)  # refuses a `which` it does not know
    config, vocab = run.load_config(), run.load_vocab()
    weights, _, manifest = load_checkpoint(folder, verify=False)  # `checkpoint()` checked it
    model = MoETransformer(config, len(vocab))
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise UserError(
            f"checkpoint {folder} does not fit the run's config ({str(err).splitlines()[0][:160]}); "
            "the run folder was changed by hand"
        ) from None
    return model.to(resolve_device(device)).eval(), vocab, int(manifest.get("step", 0))
