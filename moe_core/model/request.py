"""What a sample asks for: checked here, without torch, so that the control channel and the CLI can
parse and refuse a request before anything loads a model (moe_core/model/sampling.py generates it)."""

from __future__ import annotations

from dataclasses import dataclass

from moe_core.errors import UserError


@dataclass(frozen=True)
class SampleRequest:
    prompt: str = "\n"
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    num_samples: int = 1

    def check(self) -> None:
        if not self.prompt:
            raise UserError("the prompt is empty; give at least one character (e.g. --prompt 'HOMER:')")
        if self.max_new_tokens < 0:
            raise UserError(f"--max-new-tokens must be 0 or more, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise UserError(f"--top-k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise UserError(f"--seed must be between 0 and 2**63 - 1, got {self.seed}")
        if self.num_samples <= 0:
            raise UserError(f"--num-samples must be a positive integer, got {self.num_samples}")
