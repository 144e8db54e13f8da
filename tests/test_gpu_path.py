"""What a GPU runs, checked where it can be: on this CPU (that nothing in a step reads a value back
to the host) and, on a machine with CUDA, on the GPU itself (tests marked `gpu`, which skip without one).

A host sync is what keeps a small model from keeping a GPU busy: each `.item()`, `.tolist()`,
`bincount` or boolean-mask index makes Python wait for every queued kernel. On the `meta` device
tensors have shapes but no data, so any such read raises there: a model that runs on `meta` runs
on a GPU without a sync.
"""

from __future__ import annotations

import pytest
import torch

import moe_core.model.moe
from moe_core.config import build_config
from moe_core.model.transformer import MoETransformer
from moe_core.presets import PRESETS
from tests.test_training import make_trainer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_preset_but_small(**overrides):
    """The gpu preset's choices (router, capacity, dropout, positions) at a size a CPU test affords."""
    small = dict(n_layer=2, n_head=4, n_embd=64, block_size=32, batch_size=8)
    return {k: v for k, v in PRESETS["gpu"].items() if k not in small} | small | overrides


def meta_model(**overrides) -> MoETransformer:
    config = build_config("gpu", {}, gpu_preset_but_small(device="cpu", **overrides))
    with torch.device("meta"):
        return MoETransformer(config, 65)


def training_step(model: MoETransformer) -> None:
    x = torch.randint(65, (8, model.config.block_size), device="meta")
    out = model(x, x)
    (out.loss + 0.01 * out.aux_loss + 0.001 * out.z_loss).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


@pytest.fixture
def grouped_experts(monkeypatch):
    """Experts as a Hopper GPU runs them: the grouped matmul in bf16."""
    monkeypatch.setattr(moe_core.model.moe, "grouped_mm_dtype", lambda x, w: torch.bfloat16)


def test_a_training_step_of_the_gpu_preset_reads_nothing_back(grouped_experts):
    training_step(meta_model())  # raises "Cannot copy out of meta tensor" at the first read


def test_reading_a_value_back_is_caught(monkeypatch):
    # Guard for the test above: the per-expert loop (older GPUs) reads the expert sizes, and is caught;
    # so is capacity, which drops assignments with a boolean mask.
    monkeypatch.setattr(moe_core.model.moe, "grouped_mm_dtype", lambda x, w: None)
    with pytest.raises(NotImplementedError, match="meta tensor"):
        training_step(meta_model())
    monkeypatch.setattr(moe_core.model.moe, "grouped_mm_dtype", lambda x, w: torch.bfloat16)
    with pytest.raises(NotImplementedError):
        training_step(meta_model(capacity_factor=1.25))


def test_a_one_token_sampling_step_reads_nothing_back(grouped_experts):
    # What the CUDA graph records: one new token per sequence through the KV cache.
    model = meta_model().eval()
    step = model.token_step(3)
    with torch.no_grad():
        model(torch.randint(65, (3, 5), device="meta"), cache=step.cache)  # prefill
        logits = step(torch.randint(65, (3, 1), device="meta"))
    assert logits.shape == (3, 65) and step.cache.length == 6


# -- on the GPU itself -----------------------------------------------------------------------------


@pytest.mark.gpu
@cuda
def test_cuda_training_step_has_no_host_sync(tmp_path, shared_dir):
    trainer = make_trainer(tmp_path, shared_dir, **gpu_preset_but_small(device="cuda", log_interval=1000))
    trainer.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any sync inside the step raises
    try:
        for _ in range(3):
            trainer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@cuda
def test_cuda_fast_layers_match_the_textbook_ones_in_bf16():
    # The grouped bf16 experts against the per-expert masks, as they train: under bf16 autocast.
    from moe_core.model.moe import MoE, ReferenceMoE

    torch.manual_seed(0)
    fast = MoE(128, 8, 2).cuda()
    ref = ReferenceMoE(128, 8, 2).cuda()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(8, 64, 128, device="cuda")
    w = torch.randn(8, 64, 128, device="cuda")
    outputs, grads = [], []
    for moe in (fast, ref):
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = moe(xg)
        ((out.float() * w).sum() + moe.aux_loss).backward()
        outputs.append(out.float())
        grads.append(torch.cat([xg.grad.flatten(), moe.router.gate.weight.grad.flatten()]))
    assert fast.experts.w1.grad is not None and fast.experts.b1.grad.abs().sum() > 0
    torch.testing.assert_close(outputs[0], outputs[1], atol=3e-2, rtol=3e-2)
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cosine > 0.999, f"gradients differ: cosine {cosine:.5f}"


@pytest.mark.gpu
@cuda
def test_cuda_graph_sampling_equals_eager_and_recompute():
    config = build_config("gpu", {}, gpu_preset_but_small(device="cuda"))
    torch.manual_seed(0)
    model = MoETransformer(config, 65).cuda().eval()
    for prompt_len in (5, 20):  # fed token by token through the graph, or prefilled in one pass
        prompt = torch.randint(65, (2, prompt_len), device="cuda")
        graphed = torch.stack(list(model.generate(prompt, 3 * config.block_size, temperature=0.0)))
        step = model.token_step(2)
        assert step.graph is not None, "the one-token step was not recorded as a CUDA graph"
        step.use_graph = False
        eager = torch.stack(list(model.generate(prompt, 3 * config.block_size, temperature=0.0)))
        step.use_graph = True
        recomputed = torch.stack(list(model.generate(prompt, 3 * config.block_size, temperature=0.0, use_cache=False)))
        assert torch.equal(graphed, eager)
        agree = (graphed == recomputed).float().mean().item()
        assert torch.equal(graphed, recomputed), f"prompt of {prompt_len}: {agree:.1%} of the tokens agree"


@pytest.mark.gpu
@cuda
def test_cuda_save_and_resume_round_trip(tmp_path, shared_dir):
    small = gpu_preset_but_small(
        device="cuda", dropout=0.0, max_iters=20, ckpt_interval=10, eval_interval=10, sample_interval=1000
    )
    straight = make_trainer(tmp_path, shared_dir, name="straight", **small)
    assert straight.run() == "finished"
    first = make_trainer(tmp_path, shared_dir, name="halves", **small)
    for _ in range(10):
        first.step()
    first.save()
    saved = {k: v.clone() for k, v in first.model.state_dict().items()}
    second = make_trainer(tmp_path, shared_dir, name="halves", resume=True, **small)
    assert second.step_num == 10
    for k, v in second.model.state_dict().items():
        assert torch.equal(v, saved[k]), k  # the checkpoint restores the weights bit for bit
    assert second.run() == "finished"
    # Float atomics in the dispatch make CUDA's sums order-dependent: equal within bf16 noise.
    for (k, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2, msg=k)
