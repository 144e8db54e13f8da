"""Tests for moe_core.model.dropout and the attention path that uses it while training."""

from __future__ import annotations

import math

import pytest
import torch

from moe_core.config import Config
from moe_core.model.dropout import Dropout
from moe_core.model.transformer import CausalSelfAttention


def test_identity_in_eval_and_at_zero():
    x = torch.randn(4, 8)
    assert Dropout(0.3).eval()(x) is x
    assert Dropout(0.0).train()(x) is x


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_rate_and_scale(p):
    torch.manual_seed(0)
    x = torch.rand(1_000_003) + 1.0  # never 0, odd length: the last 64-bit draw is partly used
    y = Dropout(p).train()(x)
    dropped = (y == 0).float().mean().item()
    sigma = math.sqrt(p * (1 - p) / x.numel())
    assert abs(dropped - p) < 5 * sigma + 1 / 32768
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - round(p * 32768) / 32768))
    # Unbiased: the output's mean is the input's (within sampling error).
    assert abs(y.mean().item() - x.mean().item()) < 0.01


def test_every_lane_of_a_draw_is_uniform():
    # Four elements share one 64-bit draw; the top lane only has 15 random bits. Check each lane.
    torch.manual_seed(1)
    y = Dropout(0.5).train()(torch.ones(400_000)).view(-1, 4)
    for lane in range(4):
        assert abs((y[:, lane] == 0).float().mean().item() - 0.5) < 0.01, lane


def test_gradient_is_the_mask_times_scale():
    torch.manual_seed(2)
    x = torch.randn(64, 32, requires_grad=True)
    drop = Dropout(0.25).train()
    y = drop(x)
    y.sum().backward()
    expected = (y != 0).float() * drop.scale
    assert torch.equal(x.grad, expected)


def test_masks_follow_the_global_generator():
    x = torch.ones(1000)
    drop = Dropout(0.5).train()
    torch.manual_seed(3)
    a = drop(x)
    b = drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), a)  # reseeding repeats the mask: resumed runs draw the same ones
    assert not torch.equal(a, b)


def test_attention_dropout_path_averages_to_the_exact_attention():
    # In training with dropout, attention is computed by hand (scores, causal mask, softmax, dropout).
    # Averaged over many masks it must equal SDPA's exact causal attention; a wrong mask or scale
    # would leave a bias that does not average away.
    config = Config(n_layer=1, n_head=2, n_embd=16, block_size=8, dropout=0.3)
    torch.manual_seed(4)
    attn = CausalSelfAttention(config)
    attn.resid_dropout.threshold = 0  # look at the attention weights' dropout alone
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        exact = attn.eval()(x)
        attn.train()
        draws = torch.stack([attn(x) for _ in range(2000)])
    one_draw_error = (draws[0] - exact).abs().mean()
    mean_error = (draws.mean(0) - exact).abs().mean()
    assert mean_error < 0.05 * one_draw_error
    assert one_draw_error > 0.01  # the draws really were dropped
