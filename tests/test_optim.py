"""AdamW (moe_core/optim.py) is PyTorch's AdamW without the import of torch's compiler that comes with
`torch.optim.AdamW`: checked against `torch.optim.AdamW(fused=True)` itself, on the real model learning
real text, with dropout and router noise: the same weights and moments to the bit, and checkpoints that
either resumes exactly."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from moe_core.config import build_config
from moe_core.data.batches import token_ids
from moe_core.data.corpus import load_corpus
from moe_core.data.vocab import Vocab
from moe_core.optim import AdamW
from moe_core.train.learner import Learner
from tests.conftest import TINY


@pytest.fixture(scope="module")
def text(shared_dir) -> tuple[Vocab, torch.Tensor]:
    corpus = load_corpus("simpsons", shared_dir)
    vocab = Vocab.from_text(corpus.text)
    return vocab, token_ids(vocab, corpus.text)


def trained(text, optimizer: str, steps: int, start: dict[str, Any] | None = None) -> Learner:
    """A learner after `steps` optimizer steps (from the checkpoint `start`, if given), its optimizer
    moe_core's ("ours") or PyTorch's ("torch"); its weight decay changed, as `moe-tui set` does, at step 6."""
    config = build_config(None, {}, {**TINY, "dropout": 0.1, "router": "noisy_topk"})
    learner = Learner(config, *text)
    if optimizer == "torch":
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in learner.optimizer.param_groups]
        learner.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=True)
    if start is not None:
        learner.load_state_dict(start)
    for _ in range(steps):
        if learner.step_num == 6:
            learner.apply_settings({"weight_decay": 0.3})
        learner.step()
    return learner


def assert_same(one: Learner, other: Learner) -> None:
    a, b = one.model.state_dict(), other.model.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], "weights differ"
    moments, theirs = one.optimizer.state_dict()["state"], other.optimizer.state_dict()["state"]
    assert moments.keys() == theirs.keys()
    for i, state in moments.items():
        assert state.keys() == theirs[i].keys()
        assert all(torch.equal(v, theirs[i][k]) and v.dtype == theirs[i][k].dtype for k, v in state.items()), i


def test_it_takes_the_steps_torch_adamw_takes_to_the_bit(text):
    ours, theirs = trained(text, "ours", 12), trained(text, "torch", 12)
    assert isinstance(ours.optimizer, AdamW) and isinstance(theirs.optimizer, torch.optim.AdamW)
    assert_same(ours, theirs)
    untrained = trained(text, "ours", 0)
    assert not torch.equal(ours.model.lm_head.weight, untrained.model.lm_head.weight)  # it did learn
    assert {float(s["step"]) for s in ours.optimizer.state.values()} == {12.0}
    saved, torchs = ours.optimizer.state_dict()["param_groups"], theirs.optimizer.state_dict()["param_groups"]
    assert [sorted(g) for g in saved] == [sorted(g) for g in torchs]  # each group's keys, as PyTorch keeps them
    assert [g["weight_decay"] for g in saved] == [0.3, 0.0]  # the matrices' group took the change


def test_a_checkpoint_of_either_resumes_in_the_other_as_the_straight_run(text):
    straight = trained(text, "ours", 10)
    from_torch = trained(text, "ours", 5, start=trained(text, "torch", 5).state_dict())
    from_ours = trained(text, "torch", 5, start=trained(text, "ours", 5).state_dict())
    assert_same(from_torch, straight)
    assert_same(from_ours, straight)


def test_a_checkpoint_of_another_model_is_refused_naming_what_does_not_fit(text):
    # ValueError: what resuming turns into "checkpoint ... does not fit this model" (moe_core/train/checkpointing.py).
    optimizer = trained(text, "ours", 1).optimizer
    fewer = optimizer.state_dict()
    fewer["param_groups"][1]["params"] = fewer["param_groups"][1]["params"][:-1]
    with pytest.raises(ValueError, match=r"groups of \[\d+, \d+\] parameters, this model's \[\d+, \d+\]"):
        optimizer.load_state_dict(fewer)
    stray = optimizer.state_dict()
    stray["state"] = {**stray["state"], -1: stray["state"][0]}
    with pytest.raises(ValueError, match="moments for a parameter -1 that its groups do not list"):
        optimizer.load_state_dict(stray)
    assert {float(s["step"]) for s in optimizer.state.values()} == {1.0}  # left as it was
