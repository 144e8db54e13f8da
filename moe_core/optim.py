"""AdamW: PyTorch's own update (the functional `torch.optim.adamw.adamw`, fused kernel), with the
parameter groups and the moments held here instead of by `torch.optim.AdamW`.

Why not `torch.optim.AdamW` itself: its base class imports torch's compiler (`torch._dynamo`) when it
is built and at each step, compiled or not, and that import takes about 1.3 s of CPU on 2 cores, about
as much as importing torch: every training start, resume, fork and rank paid it before its first step.
The update is the same call with the same arguments, so the weights come out the same to the bit, and
`state_dict()` has `torch.optim.AdamW`'s layout, so a checkpoint written by either loads into the
other (both checked in tests/test_optim.py).

What it does, per parameter p with gradient g, at step t (decoupled weight decay, Loshchilov & Hutter):
    p   <- p - lr * weight_decay * p
    m   <- beta1 * m + (1 - beta1) * g            (state "exp_avg")
    v   <- beta2 * v + (1 - beta2) * g^2          (state "exp_avg_sq")
    p   <- p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.adamw import adamw

# The flags `torch.optim.AdamW(fused=True)` keeps in each group, kept alike so that its
# `load_state_dict` takes this optimizer's state (it reads them at each step).
TORCH_GROUP_FLAGS = {
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": True,
    "decoupled_weight_decay": True,
}


class AdamW:
    """AdamW over parameter groups (dicts with "params" and any of the hyperparameters), as
    `torch.optim.AdamW(groups, lr, betas, eps, weight_decay, fused=True)`: `param_groups` and `state`
    as there; `zero_grad()`, `step()`, `state_dict()`, `load_state_dict()`."""

    def __init__(
        self,
        groups: list[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, **TORCH_GROUP_FLAGS}
        self.param_groups = [{**defaults, **group, "params": list(group["params"])} for group in groups]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}  # a parameter's step and moments

    def zero_grad(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p not in self.state:
                    self.state[p] = _fresh_state(p)
            states = [self.state[p] for p in params]
            beta1, beta2 = group["betas"]
            adamw(
                params,
                [p.grad for p in params],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [],
                [s["step"] for s in states],
                fused=True,
                amsgrad=False,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )

    def state_dict(self) -> dict[str, Any]:
        """{"state": {index: moments}, "param_groups": [hyperparameters, "params": indices]}, a parameter's
        index being its place in the groups, in order: `torch.optim.Optimizer.state_dict()`'s layout. The
        tensors are the optimizer's own, not copies."""
        index = {id(p): i for i, p in enumerate(self._params())}
        groups = [{**group, "params": [index[id(p)] for p in group["params"]]} for group in self.param_groups]
        return {"state": {index[id(p)]: state for p, state in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """The inverse of `state_dict()`, from this class or `torch.optim.AdamW`: the saved hyperparameters
        replace the groups' own, and the moments move to their parameter's device and dtype."""
        groups = saved["param_groups"]
        saved_sizes, sizes = ([len(g["params"]) for g in gs] for gs in (groups, self.param_groups))
        if saved_sizes != sizes:
            raise ValueError(
                f"the saved optimizer holds parameter groups of {saved_sizes} parameters, this model's {sizes}"
            )
        # A parameter's saved index is where the saved groups list it (as torch.optim matches them).
        params = dict(zip((i for group in groups for i in group["params"]), self._params()))
        moments = {}
        for i, state in saved["state"].items():
            if i not in params:
                raise ValueError(f"the saved optimizer holds moments for a parameter {i!r} that its groups do not list")
            p = params[i]
            # A step saved as a number (older torch) becomes the tensor the fused kernel counts in.
            moments[p] = {
                k: torch.as_tensor(v).to(p.device, torch.float32 if k == "step" else p.dtype) for k, v in state.items()
            }
        self.param_groups = [{**s, "params": own["params"]} for own, s in zip(self.param_groups, groups, strict=True)]
        self.state = moments

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]


def _fresh_state(p: torch.Tensor) -> dict[str, torch.Tensor]:
    # The fused kernel counts steps in a float32 tensor on the parameter's device.
    return {
        "step": torch.zeros((), dtype=torch.float32, device=p.device),
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }
