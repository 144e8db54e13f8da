"""Where a training step's time goes: wall time per step, host (CPU) time against device time, kernel
launches and aten ops per step, and the slowest ops, for one preset on one device.

    python benchmarks/step_profile.py --preset gpu --device cuda
    python benchmarks/step_profile.py --preset gpu --device cpu --ops-only   # the op count, anywhere

The op count (aten ops dispatched per step, counted with a TorchDispatchMode) is a fair proxy for
kernel launches and can be measured without a GPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_core.config import build_config
from moe_core.data.batches import token_ids
from moe_core.data.corpus import default_data_dir, load_corpus
from moe_core.data.vocab import Vocab
from moe_core.store.runs import Run
from moe_core.train.trainer import Trainer


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="gpu")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ops-only", action="store_true")
    parser.add_argument("--batch-size", type=int, help="override the preset's (the op count does not depend on it)")
    args = parser.parse_args()

    overrides = {"device": args.device, "log_interval": 10**9}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    config = build_config(args.preset, {}, overrides)
    corpus = load_corpus("shakespeare", default_data_dir())
    vocab = Vocab.from_text(corpus.text)
    ids = token_ids(vocab, corpus.text)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run.prepare(Path(tmp), "profile", overwrite=False)
        run.initialise(config, vocab)
        trainer = Trainer(config, run, vocab, ids)
        for _ in range(2 if args.ops_only else 5):  # warm-up: optimizer state, allocator, kernels' first launches
            trainer.step()
        with CountOps() as counted:
            trainer.step()
        print(f"{args.preset} on {args.device}: {sum(counted.ops.values())} aten ops per training step")
        if args.ops_only:
            return
        sync(args.device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.step()
        sync(args.device)
        per_step = (time.perf_counter() - t0) / args.steps
        tokens = config.batch_size * config.block_size
        print(f"wall {per_step * 1e3:.2f} ms per step, {tokens / per_step:,.0f} tokens/s")

        activities = [torch.profiler.ProfilerActivity.CPU]
        if args.device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        n = 5
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(n):
                trainer.step()
            sync(args.device)
        events = prof.key_averages()
        launches = sum(
            e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        )
        device_us = sum(e.self_device_time_total for e in events)
        print(
            f"per step: {launches / n:.0f} kernel launches, device busy {device_us / n / 1e3:.2f} ms "
            f"({device_us / n / 1e3 / (per_step * 1e3):.0%} of the wall time)"
        )
        sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        print(events.table(sort_by=sort, row_limit=18, max_name_column_width=48))

        t0 = time.perf_counter()
        trainer.save()
        print(
            f"one step checkpoint: {time.perf_counter() - t0:.2f} s "
            f"({trainer.params_total / 1e6:.1f}M parameters, with the optimizer's state)"
        )


if __name__ == "__main__":
    main()
