"""What the experts learned, as Rich text: per layer, each expert's share and top characters by lift, a
character x expert heat map, which experts are picked together, how alike their outputs are, and what
switching each one off costs. Drawn by the experts screen (`r`) and `moe-tui runs show --experts`.

Lift = the share of a character's routings that go to an expert, over that expert's share of all
routings: 3.0 means the expert takes this character three times as often as it takes characters in
general. Spaces, newlines and tabs are drawn as ␣ ⏎ ⇥.
"""

from __future__ import annotations

import math

from rich.text import Text

from moe_core.events import ExpertChars, Probed
from moe_core.routing import by_frequency, co_activation, expert_shares, lift, mutual_information, routing_change, shown
from moe_core.routing import top_characters as top_chars

SHADES = " ░▒▓█"  # lift 0, <1, 1-2, 2-4, >=4


def expert_table(counts, chars: str, importance: list[float] | None = None, top: int = 8) -> list[Text]:
    """One line per expert: its share of the layer's routings, what switching it off costs, then its top
    characters with their lift."""
    share = expert_shares(counts)
    lines = []
    for e in range(len(share)):
        line = Text(f"e{e:<2} {share[e]:>4.0%}  ", style="bold")
        if importance is not None:
            line.append(f"{importance[e]:+.3f} ", style="bold red" if importance[e] == max(importance) else "")
        for char, value in top_chars(counts, chars, e, top):
            line.append(f"{shown(char)}", style="bold")
            line.append(f"{value:<4.1f} ", style="dim")
        lines.append(line)
    return lines


def heat_map(counts, chars: str, width: int) -> list[Text]:
    """Rows: experts; columns: the most frequent characters that fit; shade: lift."""
    columns = by_frequency(counts)[: max(1, width - 4)]
    lifted = lift(counts)
    lines = [Text("    " + "".join(shown(chars[i]) for i in columns), style="bold")]
    for e in range(len(counts[0])):
        row = Text(f"e{e:<2} ", style="bold")
        for i in columns:
            value = lifted[i][e]
            row.append(SHADES[0 if value <= 0 else 1 if value < 1 else 2 if value < 2 else 3 if value < 4 else 4])
        lines.append(row)
    return lines


def pair_table(title: str, matrix: list[list[float]], note: str) -> list[Text]:
    """An E x E table of shares or similarities, two digits each; the diagonal left blank."""
    experts = len(matrix)
    lines = [Text(title, style="bold"), Text("     " + "".join(f"e{j:<4}" for j in range(experts)), style="bold")]
    for i, row in enumerate(matrix):
        line = Text(f"e{i:<3} ", style="bold")
        for j, value in enumerate(row):
            cell = "  ·  " if i == j else f"{value:>4.2f} "
            line.append(cell, style="bold" if i != j and value >= 0.5 else "dim")
        lines.append(line)
    lines.append(Text(note, style="dim"))
    return lines


def describe_layer(
    event: ExpertChars,
    layer: int,
    previous: ExpertChars | None,
    width: int,
    entropy: float | None = None,
    keys: str = "",
    probed: Probed | None = None,
) -> Text:
    """The whole picture of one layer: the header, the expert table, the heat map, co-activation and,
    when a probe measured them, importance and similarity."""
    counts = event.counts[layer]
    layers, experts = len(event.counts), len(counts[0])
    header = Text(f"layer {layer + 1}/{layers}{keys} · step {event.step}", style="bold")
    if previous is not None and len(previous.counts) == layers:
        header.append(f" · moved {routing_change(previous.counts[layer], counts):.1%} since step {previous.step}")
    about = f"router entropy {entropy:.2f} nats · " if entropy is not None else ""
    importance = probed.importance[layer] if probed is not None and probed.importance else None
    columns = "expert, share, loss rise with it off, top characters by lift" if importance else ""
    body = [
        header,
        Text(f"{about}I(char; expert) {mutual_information(counts):.2f} of {math.log(experts):.2f} nats", style="dim"),
        *([Text(columns, style="dim")] if columns else []),
        *expert_table(counts, event.chars, importance),
        Text(""),
        Text("lift, how much more often than its share: ░ <1  ▒ 1-2  ▓ 2-4  █ ≥4", style="dim"),
        *heat_map(counts, event.chars, width),
    ]
    if event.pairs is not None and experts > 1:
        body += [
            Text(""),
            *pair_table(
                "picked together: of e_row's tokens, the share that also went to e_col",
                co_activation(event.pairs[layer]),
                "high: experts that work as a pair on the same tokens",
            ),
        ]
    if probed is not None and probed.similarity and experts > 1:
        body += [
            Text(""),
            *pair_table(
                f"alike: cosine of the experts' outputs on the same tokens (step {probed.step})",
                probed.similarity[layer],
                "near 1: experts that compute the same thing, one of them redundant",
            ),
        ]
    return Text("\n").join(body)
