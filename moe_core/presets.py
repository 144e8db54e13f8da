"""The named starting points of `--preset`: `seed` (the seed projects' own hyperparameters), `cpu` (a
minute to readable text on two cores) and `gpu` (one modern GPU). A config file and flags change any
key after the preset (moe_core/config.py `build_config`)."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # The seeds' hyperparameters exactly (makeMoE / Mixture of Idiotic Experts): constant lr, no aux losses.
    "seed": dict(
        n_layer=8,
        n_head=8,
        n_embd=128,
        block_size=32,
        num_experts=8,
        top_k=2,
        router="noisy_topk",
        capacity_factor=1.0,
        dropout=0.1,
        init="kaiming",
        batch_size=16,
        lr=1e-3,
        lr_schedule="constant",
        warmup_iters=0,
        max_iters=5000,
        weight_decay=0.01,
        grad_clip=0.0,
        aux_loss_coef=0.0,
        z_loss_coef=0.0,
        eval_interval=100,
        eval_iters=20,
        sample_interval=500,
        ckpt_interval=500,
    ),
    # Default on CPU: tuned for the lowest validation loss in the time 2 cores have (docs/benchmarks.md):
    # narrow (cheap steps), many experts (parameters that cost no FLOPs), rotary positions, high lr.
    "cpu": dict(
        n_layer=4,
        n_head=4,
        n_embd=64,
        block_size=64,
        pos_encoding="rope",
        num_experts=8,
        top_k=2,
        router="topk",
        capacity_factor=0.0,
        dropout=0.0,
        batch_size=32,
        lr=6e-3,
        lr_schedule="cosine",
        warmup_iters=30,
        max_iters=4000,
        eval_interval=250,
        sample_interval=500,
        ckpt_interval=500,
    ),
    # Default on CUDA: tuned for the time to nanoGPT's Tiny Shakespeare quality (docs/benchmarks.md).
    # A small model's GPU step is bound by the host launching kernels, so: 4 layers rather than 6,
    # dropless top-k routing (no host sync), rotary positions (they learn from step one) and a short,
    # hot schedule; many experts give the parameters that cost no launches.
    "gpu": dict(
        n_layer=4,
        n_head=6,
        n_embd=384,
        block_size=256,
        pos_encoding="rope",
        num_experts=8,
        top_k=2,
        router="topk",
        capacity_factor=0.0,
        dropout=0.1,
        batch_size=64,
        lr=3e-3,
        lr_schedule="cosine",
        warmup_iters=100,
        max_iters=1000,
        eval_interval=125,
        eval_iters=10,
        sample_interval=500,
        ckpt_interval=1000,
    ),
}
