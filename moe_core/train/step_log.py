"""What the trainer reports between two log lines, read from the device once per log line.

Each step's losses and gradient norm stay on the device (`StepWindow`): reading them back every step
would make the host wait for the accelerator. At a log line they are read together, checked for a
diverged step, averaged into one StepMetrics; the MoE layers' routing into one RouterStats.
With several processes both are for the global batch: means and sums over the ranks.
"""

from __future__ import annotations

import torch

from moe_core.events import LayerRouting, RouterStats
from moe_core.model.transformer import MoETransformer
from moe_core.parallel.ranks import Ranks


class NonFiniteLoss(RuntimeError):
    pass


class StepWindow:
    """(loss, aux loss, z loss, gradient norm) of each step since the last log line, as device tensors,
    and the training seconds they took."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self.rows: list[tuple[torch.Tensor, ...]] = []
        self.seconds = 0.0

    def add(self, loss: torch.Tensor, aux: torch.Tensor, z: torch.Tensor, norm: torch.Tensor) -> None:
        self.rows.append((loss.detach(), aux.detach(), z.detach(), norm.detach()))

    def clear(self) -> None:
        self.rows, self.seconds = [], 0.0

    def check(self, last_step: int, over_ranks: bool = False) -> torch.Tensor:
        """The rows (steps x 4, on the CPU), after checking that all are finite; `over_ranks`: their mean
        over all processes, the global batch's (a collective: log steps only). The gradient norm is
        global in either case, so a diverged step fails on every rank."""
        if not self.rows:
            return torch.zeros(0, 4)
        stacked = torch.stack([torch.stack(row).float() for row in self.rows])
        stacked = (self.ranks.mean(stacked) if over_ranks else stacked).cpu()  # one sync
        bad = (~torch.isfinite(stacked)).any(dim=1).nonzero()
        if len(bad):
            first = last_step - len(self.rows) + 1 + int(bad[0])
            raise NonFiniteLoss(f"loss or gradient norm became non-finite at step {first}")
        return stacked


def router_stats(model: MoETransformer, ranks: Ranks, step: int) -> RouterStats:
    """The global batch's routing in the last step, one row per layer: expert counts and dropped
    assignments summed over the ranks, entropy averaged (divided first, so that the sum is the mean);
    one collective, one read."""
    stats = [moe.stats for moe in model.moe_layers()]
    rows = ranks.sum(
        torch.stack(
            [
                torch.cat(
                    [st.tokens_per_expert.float(), st.dropped.float()[None], st.entropy.float()[None] / ranks.world]
                )
                for st in stats
            ]
        )
    ).tolist()
    return RouterStats(
        step,
        [
            LayerRouting([n / sum(row[:-2]) for n in row[:-2]], row[-2] / (st.assignments * ranks.world), row[-1])
            for row, st in zip(rows, stats)
        ],
    )
