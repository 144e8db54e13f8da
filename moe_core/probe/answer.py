"""A probe: route a text, switch experts off and compare, rank the experts. The one path the CLI, the
dashboard, a viewer and a live trainer all take, so that each shows the same numbers.

    request = ProbeRequest(text="HOMER: D'oh!", intervention=Intervention(masked=((0, 3),)))
    event = answer(model, vocab, EvalSet(val_ids, config, "cpu"), request, step=4000, source="best")
"""

from __future__ import annotations

from moe_core.data.vocab import Vocab
from moe_core.events import Probed
from moe_core.model.sampling import SampleRequest, complete
from moe_core.probe.ablate import EvalSet, importance, maskable, similarity, val_loss
from moe_core.probe.intervene import intervened
from moe_core.probe.request import SAMPLE_TEMPERATURE, ProbeRequest
from moe_core.probe.trace import trace_text


def answer(model, vocab: Vocab, evals: EvalSet, request: ProbeRequest, step: int, source: str) -> Probed:
    """Everything `request` asks of `model`, as one event."""
    change = request.intervention  # checked against the model where it is applied (`intervened`)
    routes = {}
    if request.text:
        with intervened(model, change):
            routes = trace_text(model, vocab, request.text)
    figures = {}
    if request.compare or change:
        prompt = request.prompt or vocab.default_prompt()
        sample = SampleRequest(prompt, request.sample_tokens, SAMPLE_TEMPERATURE, seed=request.seed)
        figures.update(val_loss=val_loss(model, evals), sample=complete(model, vocab, sample)[0])
        with intervened(model, change):
            figures.update(changed_sample=complete(model, vocab, sample)[0])
        figures.update(changed_val_loss=val_loss(model, evals, change))
    if request.experts:
        if maskable(model):
            figures["val_loss"], figures["importance"] = importance(model, evals)
        elif "val_loss" not in figures:  # measured already when compared
            figures["val_loss"] = val_loss(model, evals)
        figures["similarity"] = similarity(model, evals)
    return Probed(
        step=step,
        source=source,
        request_id=request.request_id,
        text=routes.get("text", ""),
        experts=routes.get("experts", []),
        gates=routes.get("gates", []),
        loss=routes.get("loss", []),
        changed=change.describe() if change else "",
        **figures,
    )
