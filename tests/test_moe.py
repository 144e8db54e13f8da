"""Tests for moe_core.model.moe: fast dispatch vs the textbook oracle, capacity, aux losses, router."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from moe_core.model.moe import MoE, ReferenceMoE, StackedExperts, count_per_expert, load_balancing_loss, router_z_loss

B, T, C = 4, 16, 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one intra-op thread is as fast, and it keeps the tests fast when the
    2-core machine is busy with something else (spinning OpenMP threads then slow down ~40x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pair(
    num_experts: int, top_k: int, noisy: bool = False, capacity_factor: float = 0.0, seed: int = 0
) -> tuple[MoE, ReferenceMoE]:
    torch.manual_seed(seed)
    fast = MoE(C, num_experts, top_k, noisy=noisy, capacity_factor=capacity_factor, dropout=0.0)
    ref = ReferenceMoE(C, num_experts, top_k, noisy=noisy, capacity_factor=capacity_factor, dropout=0.0)
    ref.load_state_dict(fast.state_dict())
    fast.train()
    ref.train()
    return fast, ref


def _stacked(moe: MoE) -> bool:
    return isinstance(moe.experts, StackedExperts)


def _expert(moe: MoE, e: int):
    """Expert e of either layout, as a function of (N, C) rows."""
    return partial(moe.experts.one, e) if _stacked(moe) else moe.experts[e]


def _fill_expert_output_bias(moe: MoE, value: float) -> None:
    with torch.no_grad():
        for bias in moe.experts.b2 if _stacked(moe) else [ex.proj.bias for ex in moe.experts]:
            bias.fill_(value)


def _run(moe: MoE, x: torch.Tensor, w: torch.Tensor, noise_seed: int):
    moe.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(noise_seed)  # the same router noise for both implementations
    out = moe(x)
    loss = (out * w).sum() + moe.aux_loss + moe.z_loss
    loss.backward()
    # Gradients in the stacked layout (an idle expert's are zero there, None per expert).
    grads = {name: p.grad if p.grad is not None else torch.zeros_like(p) for name, p in moe.named_parameters()}
    MoE.convert_expert_keys(moe, grads, "")
    return out.detach(), x.grad, grads, moe.stats, moe.aux_loss.detach(), moe.z_loss.detach()


@pytest.mark.parametrize("num_experts", [4, 8])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("noisy", [False, True])
def test_fast_matches_reference(num_experts, top_k, capacity_factor, noisy):
    fast, ref = _pair(num_experts, top_k, noisy=noisy, capacity_factor=capacity_factor, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, C, generator=g)
    w = torch.randn(B, T, C, generator=g)

    out_f, xg_f, grads_f, stats_f, aux_f, z_f = _run(fast, x, w, noise_seed=3)
    out_r, xg_r, grads_r, stats_r, aux_r, z_r = _run(ref, x, w, noise_seed=3)

    assert out_f.shape == (B, T, C)
    torch.testing.assert_close(out_f, out_r, atol=1e-5, rtol=0)
    torch.testing.assert_close(xg_f, xg_r, atol=1e-5, rtol=0)
    assert grads_f.keys() == grads_r.keys()
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_r[name], atol=1e-5, rtol=0, msg=name)
    assert torch.equal(stats_f.tokens_per_expert, stats_r.tokens_per_expert)
    assert int(stats_f.dropped) == int(stats_r.dropped)
    assert stats_f.assignments == stats_r.assignments == B * T * top_k
    assert int(stats_f.tokens_per_expert.sum()) == B * T * top_k
    torch.testing.assert_close(aux_f, aux_r)
    torch.testing.assert_close(z_f, z_r)
    torch.testing.assert_close(stats_f.entropy, stats_r.entropy)
    if capacity_factor == 0.0:
        assert int(stats_f.dropped) == 0
    else:
        assert int(stats_f.dropped) > 0, "the capacity case must really drop tokens"


@pytest.mark.parametrize("width,dtype", [(6, torch.float32), (C, torch.float64)])
def test_per_expert_fallback_matches_reference(width, dtype):
    # Rows of 6 floats (24 bytes) or doubles are outside what F.grouped_mm takes: the loop runs.
    torch.manual_seed(1)
    fast = MoE(width, 4, 2, capacity_factor=1.0).to(dtype)
    ref = ReferenceMoE(width, 4, 2, capacity_factor=1.0).to(dtype)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(B, T, width, dtype=dtype)
    w = torch.randn(B, T, width, dtype=dtype)
    out_f, xg_f, grads_f, *_ = _run(fast, x, w, noise_seed=3)
    out_r, xg_r, grads_r, *_ = _run(ref, x, w, noise_seed=3)
    torch.testing.assert_close(out_f, out_r)
    torch.testing.assert_close(xg_f, xg_r)
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_r[name], msg=name)


def test_per_expert_state_dict_loads_into_stacked():
    # The reference layer (and checkpoints saved before stacking) name each expert's Linears.
    fast, ref = _pair(4, 2, seed=1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p))
    assert "experts.3.proj.bias" in ref.state_dict()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(B, T, C)
    torch.testing.assert_close(fast.eval()(x), ref.eval()(x), atol=1e-5, rtol=0)
    assert torch.equal(fast.experts.b2[3], ref.experts[3].proj.bias)


def test_noise_actually_used_in_equality_test():
    # Guard the test above: without reseeding, two noisy forwards differ, so equality is meaningful.
    fast, _ = _pair(4, 2, noisy=True, seed=1)
    x = torch.randn(B, T, C, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    a = fast(x).detach()
    torch.manual_seed(4)
    b = fast(x).detach()
    assert not torch.allclose(a, b)


# ---------------------------------------------------------------- capacity


@pytest.mark.parametrize(
    "factor,tokens,k,e", [(1.0, 64, 1, 4), (0.5, 64, 2, 8), (1.25, 10, 2, 3), (0.1, 7, 1, 4), (2.0, 64, 2, 4)]
)
def test_capacity_formula(factor, tokens, k, e):
    moe = MoE(8, e, k, capacity_factor=factor)
    assert moe.capacity(tokens) == math.ceil(factor * tokens * k / e)
    assert MoE(8, e, k, capacity_factor=0.0).capacity(tokens) is None
    assert moe.eval().capacity(tokens) is None  # inference is always dropless


@pytest.mark.parametrize("impl", [MoE, ReferenceMoE])
@pytest.mark.parametrize("top_k,factor", [(1, 0.5), (2, 0.5), (2, 1.0), (1, 1.0)])
def test_capacity_limits_per_expert(impl, top_k, factor):
    torch.manual_seed(5)
    E = 4
    moe = impl(C, E, top_k, capacity_factor=factor)
    # Bias the router towards expert 0 so that it overflows.
    with torch.no_grad():
        moe.router.gate.weight[0, 0] = 3.0
    x = torch.randn(B, T, C)
    x[..., 0] = x[..., 0].abs() + 0.5
    rows_seen = {}  # rows each expert was really run on
    if _stacked(moe):  # its forward gets the rows sorted by expert and the count of each
        hooks = [moe.experts.register_forward_hook(lambda m, inp, out: rows_seen.update(enumerate(inp[2].tolist())))]
    else:
        hooks = [
            ex.register_forward_hook(lambda m, inp, out, e=e: rows_seen.__setitem__(e, inp[0].shape[0]))
            for e, ex in enumerate(moe.experts)
        ]
    moe(x)
    for h in hooks:
        h.remove()
    assert rows_seen
    cap = moe.capacity(B * T)
    assert cap == math.ceil(factor * B * T * top_k / E)
    counts = moe.stats.tokens_per_expert
    for e in range(E):
        expected = min(int(counts[e]), cap)
        assert rows_seen.get(e, 0) == expected
        assert rows_seen.get(e, 0) <= cap
    expected_dropped = sum(max(0, int(c) - cap) for c in counts)
    assert expected_dropped > 0
    assert int(moe.stats.dropped) == expected_dropped


@pytest.mark.parametrize("impl", [MoE, ReferenceMoE])
def test_capacity_drops_latest_tokens_top1(impl):
    torch.manual_seed(6)
    E, N = 4, 16
    moe = impl(C, E, 1, capacity_factor=0.5)  # capacity = ceil(0.5 * 16 / 4) = 2
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0, 0] = 1.0  # every token: logit 10 for expert 0, 0 for the rest
    _fill_expert_output_bias(moe, 1.0)  # make each expert's output non-zero for every token
    x = torch.randn(1, N, C)
    x[..., 0] = 10.0
    out = moe(x)[0]
    cap = moe.capacity(N)
    assert cap == 2
    assert moe.stats.tokens_per_expert.tolist() == [N, 0, 0, 0]
    assert int(moe.stats.dropped) == N - cap
    # The first `cap` tokens (token order) are processed with gate weight 1, the rest are exactly 0.
    torch.testing.assert_close(out[:cap], _expert(moe, 0)(x[0, :cap]), atol=1e-6, rtol=0)
    assert (out[:cap].abs().sum(-1) > 0).all()
    assert torch.equal(out[cap:], torch.zeros_like(out[cap:]))


@pytest.mark.parametrize("impl", [MoE, ReferenceMoE])
def test_capacity_top2_token_dropped_by_all_experts_is_zero(impl):
    torch.manual_seed(7)
    E, N = 4, 16
    moe = impl(C, E, 2, capacity_factor=0.5)  # capacity = ceil(0.5 * 16 * 2 / 4) = 4
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0, 0] = 1.0  # expert 0: logit 10
        moe.router.gate.weight[1, 0] = 0.5  # expert 1: logit 5; experts 2, 3: logit 0
    _fill_expert_output_bias(moe, 1.0)
    x = torch.randn(1, N, C)
    x[..., 0] = 10.0
    out = moe(x)[0]
    cap = moe.capacity(N)
    assert cap == 4
    assert moe.stats.tokens_per_expert.tolist() == [N, N, 0, 0]
    assert int(moe.stats.dropped) == 2 * (N - cap)
    w0, w1 = torch.softmax(torch.tensor([10.0, 5.0]), 0)
    kept = w0 * _expert(moe, 0)(x[0, :cap]) + w1 * _expert(moe, 1)(x[0, :cap])
    torch.testing.assert_close(out[:cap], kept, atol=1e-5, rtol=0)
    assert torch.equal(out[cap:], torch.zeros_like(out[cap:]))


# ---------------------------------------------------------------- aux losses


@pytest.mark.parametrize("E", [2, 4, 8])
def test_load_balancing_uniform_is_one(E):
    N = 4 * E
    probs = torch.full((N, E), 1.0 / E)
    idx = torch.arange(N).remainder(E).unsqueeze(-1)  # every expert gets N/E tokens
    assert load_balancing_loss(probs, count_per_expert(idx, E)).item() == 1.0
    idx2 = torch.stack([torch.arange(N) % E, (torch.arange(N) + 1) % E], dim=-1)  # top-2, uniform
    assert load_balancing_loss(probs, count_per_expert(idx2, E)).item() == 1.0


@pytest.mark.parametrize("E", [2, 4, 8])
def test_load_balancing_collapsed_is_E(E):
    N = 10
    probs = torch.zeros(N, E)
    probs[:, 0] = 1.0
    idx = torch.zeros(N, 1, dtype=torch.long)
    assert load_balancing_loss(probs, count_per_expert(idx, E)).item() == float(E)


def test_load_balancing_hand_example():
    probs = torch.tensor([[0.75, 0.25], [0.25, 0.75], [0.5, 0.5], [1.0, 0.0]])
    idx = torch.tensor([[0], [1], [0], [0]])
    # f = [3/4, 1/4], P = [2.5/4, 1.5/4] -> 2 * (0.75 * 0.625 + 0.25 * 0.375) = 1.125
    assert load_balancing_loss(probs, count_per_expert(idx, 2)).item() == pytest.approx(1.125, abs=1e-7)


def test_load_balancing_gradient_flows_through_probs_only():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    probs = F.softmax(logits, -1)
    idx = logits.argmax(-1, keepdim=True)
    load_balancing_loss(probs, count_per_expert(idx, 2)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("E", [1, 2, 4, 8, 5])
def test_z_loss_zero_logits(E):
    z = router_z_loss(torch.zeros(6, E))
    assert z.item() == pytest.approx(math.log(E) ** 2, abs=1e-6)


def test_z_loss_hand_example():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    # lse row 0 = ln 4; row 1 = 1 + ln 2
    expected = (math.log(4.0) ** 2 + (1.0 + math.log(2.0)) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, abs=1e-6)
    assert router_z_loss(logits.half()).dtype == torch.float32


# ---------------------------------------------------------------- router


def test_noisy_router_eval_deterministic_train_noisy():
    torch.manual_seed(8)
    moe = MoE(C, 4, 2, noisy=True)
    x = torch.randn(64, C)
    moe.eval()
    l1, w1, i1 = moe.router(x)
    l2, w2, i2 = moe.router(x)
    assert torch.equal(l1, l2) and torch.equal(w1, w2) and torch.equal(i1, i2)
    torch.testing.assert_close(l1, moe.router.gate(x))  # eval: no noise at all
    moe.train()
    t1, _, _ = moe.router(x)
    t2, _, _ = moe.router(x)
    assert not torch.allclose(t1, t2)
    assert not torch.allclose(t1, l1)


def test_plain_router_no_noise_in_train():
    torch.manual_seed(9)
    moe = MoE(C, 4, 2, noisy=False)
    moe.train()
    x = torch.randn(64, C)
    assert moe.router.noise is None
    logits, weights, idx = moe.router(x)
    # In training too, the logits are the gate's projection alone: x W^T, worked out here by hand.
    torch.testing.assert_close(logits, x @ moe.router.gate.weight.T)
    top = (x @ moe.router.gate.weight.T).topk(2, dim=-1)
    assert torch.equal(idx, top.indices)
    torch.testing.assert_close(weights, torch.softmax(top.values, -1))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_gate_weights_softmax_over_selected(top_k):
    torch.manual_seed(10)
    E = 6
    moe = MoE(C, E, top_k)
    moe.eval()
    x = torch.randn(50, C)
    logits, weights, idx = moe.router(x)
    assert weights.shape == idx.shape == (50, top_k)
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))
    # The selected experts are the top-k logits and the weights a softmax over just those.
    top_vals, top_idx = logits.topk(top_k, dim=-1)
    assert torch.equal(idx, top_idx)
    torch.testing.assert_close(weights, torch.softmax(top_vals, -1))
    sel = logits.gather(-1, idx)
    torch.testing.assert_close(weights, torch.softmax(sel, -1))
    if top_k < E:
        # Renormalised over the k selected experts: not the full softmax's probabilities.
        full = torch.softmax(logits, -1).gather(-1, idx)
        assert not torch.allclose(weights, full)


# ---------------------------------------------------------------- untouched experts


@pytest.mark.parametrize("impl", [MoE, ReferenceMoE])
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_idle_expert_gets_no_gradient(impl, capacity_factor):
    torch.manual_seed(11)
    E = 4
    moe = impl(C, E, 2, capacity_factor=capacity_factor)
    moe.train()
    with torch.no_grad():
        moe.router.gate.weight[3].zero_()
        moe.router.gate.weight[3, 0] = -100.0  # expert 3's logit is hugely negative for every token
    x = torch.randn(B, T, C)
    x[..., 0] = x[..., 0].abs() + 1.0
    out = moe(x)
    assert int(moe.stats.tokens_per_expert[3]) == 0
    (out.square().sum() + moe.aux_loss + moe.z_loss).backward()
    for e in range(4):
        if _stacked(moe):  # one gradient per stacked tensor: expert e's slice of it
            grads = [p.grad[e] for p in moe.experts.parameters()]
        else:
            grads = [p.grad for p in moe.experts[e].parameters()]
        if e == 3:  # an expert that got no tokens must not be touched
            assert all(g is None or not g.any() for g in grads)
        else:
            assert int(moe.stats.tokens_per_expert[e]) > 0
            assert all(g is not None and g.any() for g in grads)
    assert moe.router.gate.weight.grad is not None


def test_output_shape_and_empty_experts_fine():
    torch.manual_seed(12)
    moe = MoE(C, 8, 2)
    x = torch.randn(1, 1, C)  # one token: 6 of 8 experts idle
    out = moe(x)
    assert out.shape == x.shape
    assert int(moe.stats.tokens_per_expert.sum()) == 2


def test_every_expert_weighted_by_the_gates_equals_the_sorted_dispatch():
    # The path a GPU samples with: all experts on each token, the unchosen ones gated to zero.
    torch.manual_seed(3)
    moe = MoE(C, 8, 2).eval()
    x = torch.randn(6, C)
    _, weights, chosen = moe.router(x)
    gates = torch.zeros(6, 8).scatter_(1, chosen, weights)
    with torch.no_grad():
        torch.testing.assert_close(moe.experts.every(x, gates), moe(x[:, None])[:, 0], atol=1e-5, rtol=1e-5)
