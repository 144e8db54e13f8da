"""Bounded loss history: every point of a short run, evenly merged pairs of a long one.

A 100k-step run must draw as fast as a 100-step one, so the chart never walks more than `capacity`
points. When the buffer fills, neighbouring pairs are averaged into one point and later points are
merged in pairs as they come, so the stored resolution stays uniform over the whole run.
"""

from __future__ import annotations

import math


class SeriesBuffer:
    """(step, value) points of one series, at most `capacity` of them, oldest first."""

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 2 or capacity % 2:
            raise ValueError("capacity must be an even number >= 2")
        self.capacity = capacity
        self.steps: list[float] = []
        self.values: list[float] = []
        self._group = 1  # raw points per stored point
        self._pending: list[tuple[float, float]] = []  # raw points not yet merged into one

    def __len__(self) -> int:
        return len(self.steps) + (1 if self._pending else 0)

    def append(self, step: float, value: float) -> None:
        if not math.isfinite(value):
            return  # a NaN would poison every merged mean after it; the error shows elsewhere
        self._pending.append((step, value))
        if len(self._pending) < self._group:
            return
        self._store(self._pending)
        self._pending = []

    def _store(self, raw: list[tuple[float, float]]) -> None:
        self.steps.append(sum(s for s, _ in raw) / len(raw))
        self.values.append(sum(v for _, v in raw) / len(raw))
        if len(self.steps) >= self.capacity:
            self.steps = [(a + b) / 2 for a, b in zip(self.steps[::2], self.steps[1::2])]
            self.values = [(a + b) / 2 for a, b in zip(self.values[::2], self.values[1::2])]
            self._group *= 2

    def points(self, since_step: float | None = None) -> tuple[list[float], list[float]]:
        """All points (with the partly merged tail), or those at or after `since_step`."""
        steps, values = self.steps, self.values
        if self._pending:
            steps = steps + [sum(s for s, _ in self._pending) / len(self._pending)]
            values = values + [sum(v for _, v in self._pending) / len(self._pending)]
        if since_step is None:
            return steps, values
        first = next((i for i, s in enumerate(steps) if s >= since_step), len(steps))
        return steps[first:], values[first:]

    @property
    def last_step(self) -> float | None:
        if self._pending:
            return self._pending[-1][0]
        return self.steps[-1] if self.steps else None


def bucket_means(xs: list[float], ys: list[float], buckets: int) -> tuple[list[float], list[float]]:
    """At most `buckets` points: the mean of each run of consecutive points (the chart's resolution)."""
    n = len(xs)
    if n <= buckets:
        return xs, ys
    out_x, out_y = [], []
    for b in range(buckets):
        lo, hi = b * n // buckets, (b + 1) * n // buckets
        if hi > lo:
            out_x.append(sum(xs[lo:hi]) / (hi - lo))
            out_y.append(sum(ys[lo:hi]) / (hi - lo))
    return out_x, out_y
