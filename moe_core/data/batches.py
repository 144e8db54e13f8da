"""A text as a token stream, random training windows from it, the train/validation split, and the fixed
evaluation batches."""

from __future__ import annotations

from typing import Callable

import torch

from moe_core.data.vocab import Vocab


def token_ids(vocab: Vocab, text: str) -> torch.Tensor:
    """`text` as the stream of token ids the model trains on."""
    return torch.tensor(vocab.encode(text), dtype=torch.long)


class Batches:
    """Random (x, y) windows from a token stream, with its own RNG so resume can restore it.

    With several processes each draws the same global batch from the same stream and keeps its
    `shard` of the rows (see moe_core/parallel/ranks.py): the stream's state is the same on all ranks,
    and the same as one process's."""

    def __init__(
        self,
        ids: torch.Tensor,
        block_size: int,
        batch_size: int,
        seed: int,
        shard: Callable[[torch.Tensor], torch.Tensor] = lambda rows: rows,
    ):
        self.windows = ids.unfold(0, block_size + 1, 1)  # a view: row i = ids[i : i + block_size + 1]
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.shard = shard

    def next(self, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.windows[torch.randint(len(self.windows), (self.batch_size,), generator=self.generator)]
        rows = self.shard(rows)
        if device == "cuda":  # from pinned memory the copy is queued like a kernel: the host does not wait
            rows = rows.pin_memory()
        rows = rows.to(device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]


def split_ids(ids: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation): the last `val_fraction` of the text is held out."""
    split = int(len(ids) * (1 - val_fraction))
    return ids[:split], ids[split:]


def evaluation_batches(
    ids: torch.Tensor, config, split: int, shard: Callable[[torch.Tensor], torch.Tensor] = lambda rows: rows
) -> Batches:
    """The fixed batches an evaluation reads from split 0 (train) or 1 (validation): the same every time."""
    return Batches(ids, config.block_size, config.batch_size, config.seed + 1 + split, shard)
