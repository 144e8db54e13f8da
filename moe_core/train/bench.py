"""Speed measurements on the user's own machine: every ratio is measured side by side in one process.

Timings on a shared machine are noisy, so each figure is the median of several interleaved repeats:
fast, reference, fast, reference... rather than all of one then all of the other.
"""

from __future__ import annotations

import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from moe_core.config import Config
from moe_core.model.transformer import MoETransformer, reference_generate
from moe_core.optim import AdamW


@dataclass
class TrainSpeed:
    fast_tokens_per_sec: float
    reference_tokens_per_sec: float
    flops_per_token: int

    @property
    def speedup(self) -> float:
        return self.fast_tokens_per_sec / self.reference_tokens_per_sec


@dataclass
class SampleSpeed:
    cached_chars_per_sec: float
    reference_chars_per_sec: float
    first_char_ms: float

    @property
    def speedup(self) -> float:
        return self.cached_chars_per_sec / self.reference_chars_per_sec


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()


class _Stepper:
    """One model + optimizer taking real training steps on fixed random batches."""

    def __init__(self, config: Config, vocab_size: int, device: str, compile: bool):
        torch.manual_seed(config.seed)
        self.model = MoETransformer(config, vocab_size).to(device)
        self.forward = torch.compile(self.model) if compile else self.model
        self.optimizer = AdamW([{"params": self.model.parameters()}], lr=config.lr)
        g = torch.Generator().manual_seed(0)
        shape = (config.batch_size, config.block_size)
        self.x = torch.randint(vocab_size, shape, generator=g).to(device)
        self.y = torch.randint(vocab_size, shape, generator=g).to(device)
        self.device, self.tokens = device, shape[0] * shape[1]
        self.aux, self.z = config.aux_loss_coef, config.z_loss_coef

    def steps(self, n: int) -> float:
        """Tokens per second over n steps."""
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(n):
            with _autocast(self.device):
                out = self.forward(self.x, self.y)
            loss = out.loss + self.aux * out.aux_loss + self.z * out.z_loss
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        _sync(self.device)
        return n * self.tokens / (time.perf_counter() - t0)


def train_speed(
    config: Config, vocab_size: int = 65, device: str = "cpu", steps: int = 10, repeats: int = 5, compile: bool = False
) -> TrainSpeed:
    """Training tokens/s of the fast layers vs the textbook ones (per-head attention, per-expert masks)."""
    fast = _Stepper(replace(config, moe_impl="fast"), vocab_size, device, compile)
    ref = _Stepper(replace(config, moe_impl="reference"), vocab_size, device, compile)
    fast.steps(3), ref.steps(3)  # warm up allocators (and compile)
    fast_runs, ref_runs = [], []
    for _ in range(repeats):
        fast_runs.append(fast.steps(steps))
        ref_runs.append(ref.steps(steps))
    return TrainSpeed(statistics.median(fast_runs), statistics.median(ref_runs), fast.model.flops_per_token())


def describe_machine(device: str) -> dict[str, str | int]:
    """What the figures were measured on: bench tables from two machines compare only alongside this."""
    if device == "cuda":
        processor, capability = torch.cuda.get_device_name(), "sm_%d%d" % torch.cuda.get_device_capability()
    else:
        processor, capability = _cpu_model_name(), torch.backends.cpu.get_cpu_capability()
    return {
        "processor": processor,
        "capability": capability,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _cpu_model_name() -> str:
    try:  # Linux names the model here; platform.processor() is often empty there
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_peak(device: str = "cpu", size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul in the training dtype: the ceiling MFU is measured against."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = 8192 if device == "cuda" else size
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best


@torch.no_grad()
def sample_speed(
    config: Config,
    vocab_size: int = 65,
    device: str = "cpu",
    chars: int = 500,
    reference_chars: int = 100,
    repeats: int = 3,
) -> SampleSpeed:
    """Characters/s with the KV cache vs the seeds' way (reference layers, recompute every token)."""
    torch.manual_seed(config.seed)
    fast = MoETransformer(replace(config, moe_impl="fast"), vocab_size).to(device).eval()
    ref = MoETransformer(replace(config, moe_impl="reference"), vocab_size).to(device).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    cached, first, seeds = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = fast.generate(prompt, chars, temperature=0.0)
        next(tokens)
        _sync(device)  # on CUDA the character exists once its kernels have run, not when they are queued
        first.append((time.perf_counter() - t0) * 1000)
        for _ in tokens:
            pass
        _sync(device)
        cached.append(chars / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for _ in reference_generate(ref, prompt, reference_chars):
            pass
        _sync(device)
        seeds.append(reference_chars / (time.perf_counter() - t0))
    return SampleSpeed(statistics.median(cached), statistics.median(seeds), statistics.median(first))
