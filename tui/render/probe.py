"""A probed text as Rich text: each character coloured by the expert it went to in one layer, the expert's
number under it (readable without colour: NO_COLOR, a monochrome terminal, a log file), and the model's
loss on it as a strip of bars. Also the changed model beside the unchanged one. Drawn by the probe screen
(`p`) and `moe-tui probe`.
"""

from __future__ import annotations

import math

from rich.text import Text

from moe_core.events import Probed
from moe_core.routing import shown

# One colour per expert, told apart on dark and light backgrounds; past 12 they repeat (the number does not).
COLOURS = (
    "red",
    "green",
    "yellow",
    "blue",
    "magenta",
    "cyan",
    "bright_red",
    "bright_green",
    "bright_yellow",
    "bright_blue",
    "bright_magenta",
    "bright_cyan",
)
LOSS_BARS = "▁▂▃▄▅▆▇█"  # loss in nats: ▁ <1, ▂ 1-2, ... █ ≥7


def expert_mark(e: int) -> str:
    """One character per expert: 0-9, then a-z."""
    return "0123456789abcdefghijklmnopqrstuvwxyz"[e] if e < 36 else "+"


def loss_bar(loss: float | None) -> str:
    return " " if loss is None else LOSS_BARS[min(len(LOSS_BARS) - 1, max(0, int(loss)))]


def legend(experts: int) -> Text:
    line = Text("experts: ", style="dim")
    for e in range(experts):
        line.append(f"{expert_mark(e)}", style=f"bold {COLOURS[e % len(COLOURS)]}")
        line.append(f"=e{e} ", style="dim")
    return line


def routed_text(event: Probed, layer: int, width: int) -> Text:
    """The text in rows of `width`: characters coloured by their first expert in `layer`, the expert's mark
    under each, then the loss strip. A newline is drawn as ⏎ and ends its row."""
    chosen = [experts[0] for experts in event.experts[layer]]
    rows: list[list[int]] = [[]]
    for i, char in enumerate(event.text):
        if len(rows[-1]) >= max(1, width):
            rows.append([])
        rows[-1].append(i)
        if char == "\n":
            rows.append([])
    lines = []
    for row in (r for r in rows if r):
        text, marks, bars = Text(), Text(style="dim"), Text(style="dim")
        for i in row:
            colour = COLOURS[chosen[i] % len(COLOURS)]
            text.append(shown(event.text[i]) if event.text[i] in "\n\t" else event.text[i], style=f"bold {colour}")
            marks.append(expert_mark(chosen[i]), style=colour)
            bars.append(loss_bar(event.loss[i]))
        lines += [text, marks, bars]
    return Text("\n").join(lines)


def text_summary(event: Probed, layer: int, experts: int) -> Text:
    """This text's share of each of the layer's `experts` (over all k choices), and the mean loss on it."""
    counts: dict[int, int] = {}
    for chosen in event.experts[layer]:
        for e in chosen:
            counts[e] = counts.get(e, 0) + 1
    total = sum(counts.values()) or 1
    line = Text(f"layer {layer + 1}/{len(event.experts)}: ", style="bold")
    line.append("  ".join(f"e{e} {counts.get(e, 0) / total:.0%}" for e in range(experts)))
    losses = [v for v in event.loss if v is not None]
    if losses:
        mean = sum(losses) / len(losses)
        line.append(f" · loss {mean:.3f} nats/char ({mean / math.log(2):.3f} bits)", style="dim")
    line.append(f" · loss bars {LOSS_BARS[0]} <1 nat … {LOSS_BARS[-1]} ≥7", style="dim")
    return line


def comparison(event: Probed) -> Text:
    """The changed model beside the unchanged one: validation loss, and a sample from the same seed."""
    if event.val_loss is None or event.changed_val_loss is None:
        return Text("")
    rise = event.changed_val_loss - event.val_loss
    lines = [
        Text(f"changed: {event.changed or 'nothing'}", style="bold"),
        Text(
            f"validation loss  unchanged {event.val_loss:.4f}  changed {event.changed_val_loss:.4f}  "
            f"({rise:+.4f}, {rise / event.val_loss:+.1%})"
        ),
        Text("sample, unchanged (same seed):", style="bold"),
        Text(event.sample),
        Text("sample, changed:", style="bold"),
        Text(event.changed_sample),
    ]
    return Text("\n").join(lines)
