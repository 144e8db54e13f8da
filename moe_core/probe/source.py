"""A saved model to probe: a run's checkpoint, its vocabulary and its fixed evaluation batches.

What the CLI, the report and a viewer with no live trainer probe (a live trainer probes its own weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moe_core.data.batches import split_ids, token_ids
from moe_core.data.corpus import load_corpus
from moe_core.data.vocab import Vocab
from moe_core.events import ExpertChars, Probed
from moe_core.model.routes import RouteCounter
from moe_core.model.sampling import load_model
from moe_core.probe.ablate import EvalSet
from moe_core.probe.answer import ProbeRequest, answer
from moe_core.store.runs import Run


@dataclass
class SavedModel:
    model: torch.nn.Module
    vocab: Vocab
    evals: EvalSet
    step: int
    source: str  # the checkpoint: "best", "latest", "step-500"

    @classmethod
    def load(cls, run: Run, which: str, data_dir: Path, device: str = "cpu") -> SavedModel:
        model, vocab, step = load_model(run, which, device)
        config = run.load_config()
        corpus = load_corpus(config.dataset, data_dir, columns=config.columns, encoding=config.encoding)
        _, val = split_ids(token_ids(vocab, corpus.text), config.val_fraction)
        return cls(model, vocab, EvalSet(val, config, device), step, which)

    def probe(self, request: ProbeRequest) -> Probed:
        return answer(self.model, self.vocab, self.evals, request, self.step, self.source)

    def experts(self) -> tuple[ExpertChars, Probed]:
        """Everything known of its experts: which characters each takes and who goes with whom (`routes`),
        and what each is worth and which are alike (a probe's importance and similarity)."""
        return self.routes(), self.probe(ProbeRequest(experts=True))

    @torch.no_grad()
    def routes(self) -> ExpertChars:
        """Which characters each expert takes, and which experts go together, on the evaluation batches
        (for `best`: the same counts its evaluation logged)."""
        counter = RouteCounter(self.model, len(self.vocab))
        with counter.recording():
            for x, y in self.evals.batches:
                self.model(x, y)
                counter.add(x)
        return ExpertChars(self.step, "".join(self.vocab.chars), counter.counts.tolist(), counter.pairs.tolist())
