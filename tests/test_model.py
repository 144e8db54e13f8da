"""Tests for moe_core.model.transformer: shapes, parameter counts, fused vs reference attention, KV cache, sampling."""

from __future__ import annotations

import math

import pytest
import torch

from moe_core.config import Config, build_config
from moe_core.model.moe import MoE, ReferenceMoE
from moe_core.model.transformer import (
    CausalSelfAttention,
    KVCache,
    MoETransformer,
    ReferenceAttention,
    Rotary,
    reference_generate,
    sample_next,
)

V = 65


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one intra-op thread is as fast, and it keeps the tests fast when the
    2-core machine is busy with something else (spinning OpenMP threads then slow down ~40x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(**kw) -> Config:
    values = dict(
        n_layer=2,
        n_head=4,
        n_embd=32,
        block_size=16,
        num_experts=4,
        top_k=2,
        router="topk",
        capacity_factor=0.0,
        dropout=0.0,
        device="cpu",
    )
    values.update(kw)
    return Config(**values)


def make_model(seed: int = 0, vocab: int = V, **kw) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(small_config(**kw), vocab)


# ---------------------------------------------------------------- shapes, loss, parameter counts


def test_forward_shapes_and_initial_loss():
    model = make_model()
    model.train()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (3, 16), generator=g)
    targets = torch.randint(0, V, (3, 16), generator=g)
    out = model(idx, targets)
    assert out.logits.shape == (3, 16, V)
    assert out.loss is not None and out.loss.shape == () and torch.isfinite(out.loss)
    # At init the model is close to uniform over the vocabulary: loss near ln V, certainly not far off.
    assert abs(out.loss.item() - math.log(V)) < 2.0
    assert out.aux_loss.shape == () and torch.isfinite(out.aux_loss) and out.aux_loss.item() >= 1.0 - 1e-5
    assert out.z_loss.shape == () and torch.isfinite(out.z_loss)
    # aux/z are the mean over layers of each MoE layer's values.
    layers = model.moe_layers()
    assert len(layers) == 2
    torch.testing.assert_close(out.aux_loss, torch.stack([m.aux_loss for m in layers]).mean())
    torch.testing.assert_close(out.z_loss, torch.stack([m.z_loss for m in layers]).mean())
    # Without targets only the last position's logits are computed.
    out2 = model(idx)
    assert out2.loss is None and out2.logits.shape == (3, 1, V)
    out.loss.backward()
    assert model.tok_emb.weight.grad is not None


def test_shorter_sequence_than_block():
    model = make_model().eval()
    idx = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(0))
    assert model(idx, idx).logits.shape == (2, 5, V)


def _per_expert(C: int) -> int:
    return (C * 4 * C + 4 * C) + (4 * C * C + C)


# Counted by hand for small_config (2 layers, 32 wide, block 16, vocabulary 65): embeddings 65*32 + 16*32
# = 2,592; per block attention 32*96+96 + 32*32+32 = 4,224, two LayerNorms 128, the router 32*E (twice
# with noise), each expert 8,352; the head 2*32 + 32*65+65 = 2,209. A token uses k of the E experts.
@pytest.mark.parametrize(
    "E,k,router,total,active",
    [
        (4, 2, "topk", 80_577, 47_169),  # 2,592 + 2 * (4,224 + 128 + 128 + 4 * 8,352) + 2,209
        (8, 1, "noisy_topk", 148_161, 31_233),  # 2,592 + 2 * (4,224 + 128 + 512 + 8 * 8,352) + 2,209
        (3, 3, "topk", 63_809, 63_809),  # 2,592 + 2 * (4,224 + 128 + 96 + 3 * 8,352) + 2,209
    ],
)
def test_num_params(E, k, router, total, active):
    model = make_model(num_experts=E, top_k=k, router=router)
    assert model.num_params() == (total, active)
    assert sum(p.numel() for p in model.blocks[0].moe.experts.parameters()) == E * _per_expert(32)


def test_num_params_seed_preset_hand_count():
    config = build_config("seed", {}, {"device": "cpu"})
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size) == (8, 8, 128, 32)
    assert (config.num_experts, config.top_k, config.router) == (8, 2, "noisy_topk")
    torch.manual_seed(0)
    model = MoETransformer(config, 65)
    C, L, E, k, bs = 128, 8, 8, 2, 32
    embeddings = 65 * C + bs * C
    attention = (C * 3 * C + 3 * C) + (C * C + C)
    layernorms = 2 * (2 * C)
    router = 2 * C * E  # gate + noise, no bias
    expert = _per_expert(C)
    assert expert == 131712
    block = attention + layernorms + router + E * expert
    head = 2 * C + (C * 65 + 65)  # ln_f + lm_head
    total = embeddings + L * block + head
    active = total - L * (E - k) * expert
    assert (total, active) == (8_999_489, 2_677_313)  # written out once, by hand
    assert model.num_params() == (total, active)


def test_rope_model_has_no_position_table():
    learned, rope = make_model(), make_model(pos_encoding="rope")
    assert rope.pos_emb is None and not any("pos_emb" in k or "rotary" in k for k in rope.state_dict())
    C, bs = 32, 16
    assert rope.num_params()[0] == learned.num_params()[0] - bs * C
    assert rope.flops_per_token() == learned.flops_per_token()  # position tables are not matmuls


# ---------------------------------------------------------------- rotary position embedding


def test_rope_scores_depend_only_on_distance():
    rotary = Rotary(head_dim=16, max_len=64)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 16, generator=g), torch.randn(1, 16, generator=g)

    def score(i: int, j: int) -> torch.Tensor:  # query at position i, key at position j
        return (rotary(q, i) * rotary(k, j)).sum()

    for i, j, shift in [(5, 2, 7), (9, 9, 30), (3, 0, 60)]:
        torch.testing.assert_close(score(i + shift, j + shift), score(i, j), atol=1e-5, rtol=0)
    # Guards: the distance matters, and a rotation keeps each vector's length.
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)
    torch.testing.assert_close(rotary(q, 11).norm(), q.norm())


def test_rope_rotates_by_position_within_a_sequence():
    # A (T, D) sequence at `start` is position by position what single rows at start + t get.
    rotary = Rotary(head_dim=8, max_len=32)
    x = torch.randn(2, 3, 10, 8, generator=torch.Generator().manual_seed(1))
    rows = torch.cat([rotary(x[..., t : t + 1, :], 4 + t) for t in range(10)], dim=-2)
    torch.testing.assert_close(rotary(x, 4), rows)
    torch.testing.assert_close(rotary(x[..., :1, :], 0), x[..., :1, :])  # position 0: no rotation


def test_dense_baseline():
    model = make_model(num_experts=1, top_k=1)
    total, active = model.num_params()
    assert active == total
    model.train()
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(idx, idx)
    assert torch.isfinite(out.loss)
    # One expert, one choice: the load-balancing loss is exactly 1 and z-loss is logit^2.
    assert out.aux_loss.item() == pytest.approx(1.0)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.any() for p in model.blocks[0].moe.experts.parameters())


# ---------------------------------------------------------------- fused vs reference attention


def _copy_attention(fused: CausalSelfAttention, ref: ReferenceAttention) -> None:
    with torch.no_grad():
        q = torch.cat([m.weight for m in ref.queries], dim=0)
        k = torch.cat([m.weight for m in ref.keys], dim=0)
        v = torch.cat([m.weight for m in ref.values], dim=0)
        fused.qkv.weight.copy_(torch.cat([q, k, v], dim=0))
        fused.qkv.bias.zero_()
        fused.proj.load_state_dict(ref.proj.state_dict())


def test_reference_impl_builds_reference_modules():
    model = make_model(moe_impl="reference")
    for block in model.blocks:
        assert isinstance(block.attn, ReferenceAttention)
        assert type(block.moe) is ReferenceMoE
    model = make_model(moe_impl="fast")
    for block in model.blocks:
        assert isinstance(block.attn, CausalSelfAttention)
        assert type(block.moe) is MoE


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
@pytest.mark.parametrize("T", [1, 7, 16])
def test_fused_attention_matches_reference(T, pos_encoding):
    config = small_config(pos_encoding=pos_encoding)
    torch.manual_seed(3)
    ref = ReferenceAttention(config).eval()
    fused = CausalSelfAttention(config).eval()
    with torch.no_grad():  # give the projection a non-zero bias so that it is really compared
        ref.proj.bias.normal_()
    _copy_attention(fused, ref)
    x = torch.randn(3, T, config.n_embd)
    torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=0)


def test_fused_attention_layout_matters():
    # Guard: a wrong layout (k before q) gives a different answer, so the test above can fail.
    config = small_config()
    torch.manual_seed(3)
    ref = ReferenceAttention(config).eval()
    fused = CausalSelfAttention(config).eval()
    _copy_attention(fused, ref)
    with torch.no_grad():
        w = fused.qkv.weight.clone()
        C = config.n_embd
        fused.qkv.weight[:C], fused.qkv.weight[C : 2 * C] = w[C : 2 * C], w[:C]
    x = torch.randn(3, 16, C)
    assert not torch.allclose(fused(x), ref(x), atol=1e-3)


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_whole_model_fast_matches_reference(pos_encoding):
    fast = make_model(seed=4, pos_encoding=pos_encoding)
    ref = make_model(seed=5, moe_impl="reference", pos_encoding=pos_encoding)
    # Everything but attention shares names; attention is mapped per head.
    ref_state = ref.state_dict()
    shared = {k: v for k, v in fast.state_dict().items() if ".attn." not in k}
    missing = ref.load_state_dict(shared, strict=False)
    assert all(".attn." in k for k in missing.missing_keys) and not missing.unexpected_keys
    for bf, br in zip(fast.blocks, ref.blocks):
        with torch.no_grad():
            C, hs = fast.config.n_embd, fast.config.head_dim
            w = bf.attn.qkv.weight
            for h in range(fast.config.n_head):
                br.attn.queries[h].weight.copy_(w[h * hs : (h + 1) * hs])
                br.attn.keys[h].weight.copy_(w[C + h * hs : C + (h + 1) * hs])
                br.attn.values[h].weight.copy_(w[2 * C + h * hs : 2 * C + (h + 1) * hs])
            br.attn.proj.load_state_dict(bf.attn.proj.state_dict())
    assert ref_state.keys() == ref.state_dict().keys()
    fast.eval()
    ref.eval()
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    a, b = fast(idx, idx), ref(idx, idx)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- KV cache and generation


def _gen(model, prompt, n, **kw):
    return torch.stack(list(model.generate(prompt, n, temperature=0.0, **kw)), dim=1)


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
@pytest.mark.parametrize("prompt_len", [5, 21])
def test_cached_greedy_generation_matches_uncached(prompt_len, pos_encoding):
    model = make_model(seed=6, pos_encoding=pos_encoding).eval()
    bs = model.config.block_size
    prompt = torch.randint(0, V, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    n = 3 * bs
    cached = _gen(model, prompt, n, use_cache=True)
    uncached = _gen(model, prompt, n, use_cache=False)
    assert cached.shape == (2, n)
    assert torch.equal(cached, uncached)
    ref = torch.stack(list(reference_generate(model, prompt, max(1, bs - prompt_len))), dim=1)
    m = bs - prompt_len
    if m > 0:
        assert torch.equal(cached[:, :m], ref[:, :m])
    else:  # a long prompt: only the first token sees the same (last block_size) window
        assert torch.equal(cached[:, :1], ref[:, :1])


def test_generation_is_not_constant():
    # Guard for the equality test above: a random model's greedy output varies between prompts.
    model = make_model(seed=6).eval()
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))
    out = _gen(model, prompt, 16)
    assert len(torch.unique(out)) > 1


def _cache_for(model, batch):
    c = model.config
    return KVCache(c.n_layer, batch, c.n_head, c.block_size, c.head_dim, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
@pytest.mark.parametrize("prefill", [0, 1, 5])
def test_cached_logits_match_full_forward(prefill, pos_encoding):
    model = make_model(seed=7, pos_encoding=pos_encoding).eval()
    bs = model.config.block_size
    idx = torch.randint(0, V, (2, bs), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx, idx).logits
        cache = _cache_for(model, 2)
        steps = []
        if prefill:
            steps.append(model(idx[:, :prefill], cache=cache).logits[:, -1])
        for t in range(prefill, bs):
            steps.append(model(idx[:, t : t + 1], cache=cache).logits[:, -1])
    assert cache.length == bs
    start = max(prefill - 1, 0)
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, start:], atol=1e-5, rtol=0)


# Capacity drops tokens only in training: at inference a token's output must not depend on how many
# tokens share the forward call (one, when sampling with the KV cache).
@pytest.mark.parametrize("batch", [1, 2])
def test_generate_with_capacity_cached_matches_uncached(batch):
    model = make_model(seed=6, capacity_factor=1.0, num_experts=8).eval()
    bs = model.config.block_size
    prompt = torch.randint(0, V, (batch, 5), generator=torch.Generator().manual_seed(1))
    cached = _gen(model, prompt, 3 * bs, use_cache=True)
    uncached = _gen(model, prompt, 3 * bs, use_cache=False)
    assert torch.equal(cached, uncached)


def test_cached_logits_match_full_forward_with_capacity():
    model = make_model(seed=7, capacity_factor=1.0, num_experts=8).eval()
    bs = model.config.block_size
    idx = torch.randint(0, V, (1, bs), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx, idx).logits
        cache = _cache_for(model, 1)
        steps = [model(idx[:, t : t + 1], cache=cache).logits[:, -1] for t in range(bs)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=0)


def test_generate_sampling_reproducible_with_generator():
    model = make_model(seed=8).eval()
    prompt = torch.zeros(2, 1, dtype=torch.long)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.stack(list(model.generate(prompt, 20, temperature=1.0, top_k=10, generator=g)), 1)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


# ---------------------------------------------------------------- sample_next


def _logits(seed=0, B=4, V_=50):
    return torch.randn(B, V_, generator=torch.Generator().manual_seed(seed)) * 3


def test_sample_temperature_zero_is_argmax():
    logits = _logits()
    assert torch.equal(sample_next(logits, 0.0, None, None, None), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 0.0, 5, 0.9, None), logits.argmax(-1))


def test_sample_top_k_one_is_argmax():
    logits = _logits(1)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert torch.equal(sample_next(logits, 1.5, 1, None, g), logits.argmax(-1))


def test_sample_tiny_top_p_is_argmax():
    logits = _logits(2)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert torch.equal(sample_next(logits, 1.0, None, 1e-6, g), logits.argmax(-1))


def test_sample_reproducible_with_generator():
    logits = _logits(3)
    a = [sample_next(logits, 1.0, None, None, torch.Generator().manual_seed(42)) for _ in range(3)]
    assert all(torch.equal(a[0], x) for x in a)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    s1 = torch.stack([sample_next(logits, 1.0, 10, 0.9, g1) for _ in range(20)])
    s2 = torch.stack([sample_next(logits, 1.0, 10, 0.9, g2) for _ in range(20)])
    assert torch.equal(s1, s2)
    assert len(torch.unique(s1)) > 4  # it really samples


def test_sample_top_k_restricts_support():
    logits = _logits(4)
    k = 5
    allowed = logits.topk(k, dim=-1).indices
    g = torch.Generator().manual_seed(0)
    seen = [set() for _ in range(logits.shape[0])]
    for _ in range(300):
        s = sample_next(logits, 2.0, k, None, g)
        for b in range(logits.shape[0]):
            assert int(s[b]) in set(allowed[b].tolist())
            seen[b].add(int(s[b]))
    assert any(len(x) > 1 for x in seen)


def test_sample_top_p_restricts_support():
    # probs 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps the first two (mass before #3 is 0.8 >= 0.7).
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, 1.0, None, 0.7, g)) for _ in range(300)}
    assert seen == {0, 1}


# ---------------------------------------------------------------- init


def test_inits_finite_and_different():
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    losses, weights = {}, {}
    for init in ("kaiming", "xavier", "normal"):
        model = make_model(seed=9, init=init).eval()
        out = model(idx, idx)
        assert torch.isfinite(out.loss)
        losses[init] = out.loss.item()
        weights[init] = model.blocks[0].moe.experts.w1[0].detach().clone()  # expert 0's first Linear
        assert torch.equal(model.blocks[0].attn.qkv.bias, torch.zeros_like(model.blocks[0].attn.qkv.bias))
    names = list(losses)
    for i in range(3):
        for j in range(i + 1, 3):
            assert losses[names[i]] != losses[names[j]]
            assert not torch.allclose(weights[names[i]], weights[names[j]])
    # normal init uses std 0.02; kaiming (fan_in 32, ReLU gain) has std sqrt(2/32) = 0.25.
    assert weights["normal"].std().item() == pytest.approx(0.02, rel=0.1)
    assert weights["kaiming"].std().item() == pytest.approx(math.sqrt(2 / 32), rel=0.1)
    # Stacked, each expert's (out, in) matrix is still initialised as one nn.Linear: fan_in 128 here.
    w2 = make_model(seed=9, init="kaiming").blocks[0].moe.experts.w2
    assert w2[1].std().item() == pytest.approx(math.sqrt(2 / 128), rel=0.1)
    bound = math.sqrt(6 / (32 + 128))
    assert weights["xavier"].abs().max().item() <= bound
