"""Shared fixtures: the offline copies of the named corpora, and tiny real configs that train in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moe_core.data import CORPORA, load_corpus

REPO = Path(__file__).resolve().parents[1]

# Tests run many small models one after another; two intra-op threads on two cores is the sweet spot,
# and more would oversubscribe when pytest runs beside a subprocess under test.
torch.set_num_threads(min(2, torch.get_num_threads()))


def shared_data_dir() -> Path:
    """$MOE_TUI_DATA (CI points it at the offline copies), else the project's own data/ cache."""
    path = Path(os.environ.get("MOE_TUI_DATA") or REPO / "data")
    return path if path.is_absolute() else REPO / path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """A folder holding both named corpora, checked by sha256; downloaded once if it lacks them."""
    path = shared_data_dir()
    for name in CORPORA:
        load_corpus(name, path)  # no network when the file is there with the right hash
    return path


# A model small enough to train a few hundred steps in seconds on 2 CPU cores, but a real sparse MoE.
TINY = dict(n_layer=2, n_head=4, n_embd=64, block_size=32, num_experts=4, top_k=2, batch_size=32,
            lr=3e-3, warmup_iters=20, eval_interval=50, eval_iters=5, log_interval=10, sample_interval=100,
            sample_tokens=40, ckpt_interval=50, device="cpu")
TINY_FLAGS = [arg for key, value in TINY.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
