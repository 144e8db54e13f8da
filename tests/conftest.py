"""Shared fixtures: the offline copies of the named corpora, and tiny real configs that train in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moe_core.data import CORPORA

REPO = Path(__file__).resolve().parents[1]

# Tests run many small models one after another; two intra-op threads on two cores is the sweet spot,
# and more would oversubscribe when pytest runs beside a subprocess under test.
torch.set_num_threads(min(2, torch.get_num_threads()))


def shared_data_dir() -> Path:
    # CI sets MOE_TUI_DATA relative to the repo root; resolve it from there whatever the cwd.
    path = Path(os.environ.get("MOE_TUI_DATA", REPO / ".." / "shared" / "data"))
    return path if path.is_absolute() else REPO / path


@pytest.fixture
def shared_dir() -> Path:
    """The read-only folder with byte-exact copies of the named corpora (never written to)."""
    path = shared_data_dir()
    if not all((path / c.filename).is_file() for c in CORPORA.values()):
        pytest.skip(f"offline copies of the named corpora not found in {path} (set MOE_TUI_DATA)")
    return path


# A model small enough to train a few hundred steps in seconds on 2 CPU cores, but a real sparse MoE.
TINY = dict(n_layer=2, n_head=4, n_embd=64, block_size=32, num_experts=4, top_k=2, batch_size=32,
            lr=3e-3, warmup_iters=20, eval_interval=50, eval_iters=5, log_interval=10, sample_interval=100,
            sample_tokens=40, ckpt_interval=50, device="cpu")
TINY_FLAGS = [arg for key, value in TINY.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
