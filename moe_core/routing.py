"""What routing counts say, read the way a person learning MoE asks: which characters does an expert
take more often than its share, how much does a character say about its expert, which experts are picked
together, how far has the routing moved.

Plain Python on the nested lists the events carry (`ExpertChars.counts[layer]`: character x expert,
`ExpertChars.pairs[layer]`: expert x expert), so that a viewer draws them without importing torch. A
tensor works too (it is read into lists first). Sizes are a vocabulary by a few experts: microseconds.
"""

from __future__ import annotations

import math
from typing import Sequence

Matrix = Sequence[Sequence[float]]


def _rows(counts: Matrix) -> list[list[float]]:
    return [[float(v) for v in row] for row in counts]


def lift(counts: Matrix) -> list[list[float]]:
    """(V, E) counts of one layer -> (V, E) lift: the share of a character's routings that go to an
    expert, over that expert's share of all routings (1 = no preference; 0 where a character is unseen)."""
    rows = _rows(counts)
    total = sum(map(sum, rows)) or 1.0
    share = [max(sum(col) / total, 1e-12) for col in zip(*rows)] if rows else []
    return [[v / (sum(row) or 1.0) / s if sum(row) > 0 else 0.0 for v, s in zip(row, share)] for row in rows]


def frequent(counts: Matrix, min_share: float = 0.001) -> list[bool]:
    """Per character: seen at least `min_share` of the time (a rarer character's lift is noise)."""
    per_char = [sum(row) for row in _rows(counts)]
    total = sum(per_char)
    return [n >= min_share * total for n in per_char]


def by_frequency(counts: Matrix, min_share: float = 0.001) -> list[int]:
    """The characters seen at least `min_share` of the time, most frequent first: a heat map's columns."""
    per_char, common = [sum(row) for row in _rows(counts)], frequent(counts, min_share)
    return [i for i in sorted(range(len(per_char)), key=lambda i: -per_char[i]) if common[i]]


def top_characters(
    counts: Matrix, chars: str, expert: int, n: int = 8, min_share: float = 0.001
) -> list[tuple[str, float]]:
    """The `n` characters with the highest lift for `expert` in one layer's (V, E) counts, leaving
    out characters rarer than `min_share` of the text."""
    lifted, common = lift(counts), frequent(counts, min_share)
    scored = [(lifted[i][expert], i) for i in range(len(lifted)) if common[i] and lifted[i][expert] > 0]
    scored.sort(key=lambda pair: (-pair[0], pair[1]))
    return [(chars[i], value) for value, i in scored[:n]]


def mutual_information(counts: Matrix) -> float:
    """I(character; expert) in nats from one layer's (V, E) counts: how much the character says
    about the expert chosen (0 = nothing; at most ln E)."""
    rows = _rows(counts)
    total = sum(map(sum, rows)) or 1.0
    p_char = [sum(row) / total for row in rows]
    p_expert = [sum(col) / total for col in zip(*rows)] if rows else []
    return sum(
        v / total * math.log(v / total / (p_char[i] * p_expert[e]))
        for i, row in enumerate(rows)
        for e, v in enumerate(row)
        if v > 0
    )


def routing_change(before: Matrix, after: Matrix) -> float:
    """How much one layer's picture moved between two evaluations: the total variation distance
    between each character's distribution over experts then and now, averaged with the characters'
    frequencies (0 = the same routing; 1 = every character now goes to other experts)."""

    def per_char(row: list[float]) -> list[float]:
        n = sum(row) or 1.0
        return [v / n for v in row]

    weights = [sum(row) for row in _rows(after)]
    distances = [
        0.5 * sum(abs(a - b) for a, b in zip(per_char(old), per_char(new)))
        for old, new in zip(_rows(before), _rows(after))
    ]
    return sum(d * w for d, w in zip(distances, weights)) / (sum(weights) or 1.0)


def expert_shares(counts: Matrix) -> list[float]:
    """Each expert's share of one layer's routings (sums to 1)."""
    columns = [sum(col) for col in zip(*_rows(counts))]
    total = sum(columns) or 1.0
    return [c / total for c in columns]


def co_activation(pairs: Matrix) -> list[list[float]]:
    """(E, E) how often a top-k router picks experts i and j for the same token, as a share of the
    tokens routed to i (the diagonal counts i's tokens): row i says who works beside expert i."""
    rows = _rows(pairs)
    return [[0.0 if i == j else v / (row[i] or 1.0) for j, v in enumerate(row)] for i, row in enumerate(rows)]


def shown(char: str) -> str:
    """A character as a person can see it: spaces, newlines and tabs named."""
    return {" ": "␣", "\n": "⏎", "\t": "⇥"}.get(char, char)
