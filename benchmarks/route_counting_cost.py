"""What counting which characters each expert takes costs: an evaluation with the counting against
the same evaluation without it, alternated in one process (a training step is untouched: the routers
are hooked only inside the evaluation's validation batches).

    python benchmarks/route_counting_cost.py --preset cpu --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from moe_core.config import build_config
from moe_core.data.batches import evaluation_batches, token_ids
from moe_core.data.corpus import default_data_dir, load_corpus
from moe_core.data.vocab import Vocab
from moe_core.model.routes import RouteCounter
from moe_core.store.runs import Run
from moe_core.train.trainer import Trainer


def evaluation_seconds(trainer: Trainer, count: bool) -> float:
    """One validation pass of the evaluation, with or without the counting."""
    c = trainer.config
    batches = evaluation_batches(trainer.val_ids, c, split=1)
    routes = RouteCounter(trainer.model, len(trainer.vocab))
    start = time.perf_counter()
    with torch.no_grad(), routes.recording() if count else nullcontext():
        for _ in range(c.eval_iters):
            x, y = batches.next("cpu")
            trainer.model(x, y)
            if count:
                routes.add(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    config = build_config(args.preset, {}, {"dataset": "simpsons", "device": "cpu"})
    corpus = load_corpus("simpsons", default_data_dir())
    vocab = Vocab.from_text(corpus.text)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, Run.prepare(Path(tmp), "cost", False), vocab, token_ids(vocab, corpus.text))
        trainer.model.eval()
        evaluation_seconds(trainer, True)  # warm-up
        plain, counted = [], []
        for _ in range(args.repeats):
            plain.append(evaluation_seconds(trainer, False))
            counted.append(evaluation_seconds(trainer, True))
    p, q = statistics.median(plain), statistics.median(counted)
    print(
        f"preset {args.preset}: validation pass of {config.eval_iters} batches: {p * 1000:.0f} ms plain, "
        f"{q * 1000:.0f} ms counting ({q / p - 1:+.1%}); median of {args.repeats}, alternated"
    )


if __name__ == "__main__":
    main()
