"""What the experts learn: per layer, each expert's top characters by lift, and a character x expert
heat map. A screen over the dashboard (`r`), and the same table for `moe-tui runs show --experts`.

Lift = the share of a character's routings that go to an expert, over that expert's share of all
routings: 3.0 means the expert takes this character three times as often as it takes characters in
general. Spaces, newlines and tabs are drawn as ␣ ⏎ ⇥.
"""

from __future__ import annotations

import math

import torch
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

from moe_core.events import ExpertChars
from moe_core.model.routes import lift, mutual_information, routing_change, shown, top_characters

SHADES = " ░▒▓█"  # lift 0, <1, 1-2, 2-4, >=4


def expert_table(counts: torch.Tensor, chars: str, top: int = 8) -> list[Text]:
    """One line per expert: its share of the layer's routings, then its top characters with their lift."""
    share = counts.sum(dim=0).double() / counts.sum().clamp_min(1)
    lines = []
    for e in range(counts.shape[1]):
        best = top_characters(counts, chars, e, top)
        line = Text(f"e{e:<2} {share[e]:>4.0%}  ", style="bold")
        for char, value in best:
            line.append(f"{shown(char)}", style="bold")
            line.append(f"{value:<4.1f} ", style="dim")
        lines.append(line)
    return lines


def heat_map(counts: torch.Tensor, chars: str, width: int) -> list[Text]:
    """Rows: experts; columns: the most frequent characters that fit; shade: lift."""
    frequency = counts.sum(dim=1)
    common = frequency >= 0.001 * frequency.sum()  # rarer characters' lift is noise
    columns = [i for i in frequency.argsort(descending=True).tolist() if common[i]][: max(1, width - 4)]
    lifted = lift(counts)
    lines = [Text("    " + "".join(shown(chars[i]) for i in columns), style="bold")]
    for e in range(counts.shape[1]):
        row = Text(f"e{e:<2} ", style="bold")
        for i in columns:
            value = float(lifted[i, e])
            row.append(SHADES[0 if value <= 0 else 1 if value < 1 else 2 if value < 2 else 3 if value < 4 else 4])
        lines.append(row)
    return lines


def describe_layer(
    event: ExpertChars,
    layer: int,
    previous: ExpertChars | None,
    width: int,
    entropy: float | None = None,
    keys: str = "",
) -> Text:
    counts = torch.tensor(event.counts[layer])
    layers = len(event.counts)
    experts = counts.shape[1]
    header = Text(f"layer {layer + 1}/{layers}{keys} · step {event.step}", style="bold")
    if previous is not None and len(previous.counts) == layers:
        moved = routing_change(torch.tensor(previous.counts[layer]), counts)
        header.append(f" · moved {moved:.1%} since step {previous.step}", style="bold")
    about = f"router entropy {entropy:.2f} nats · " if entropy is not None else ""
    body = [
        header,
        Text(f"{about}I(char; expert) {mutual_information(counts):.2f} of {math.log(experts):.2f} nats", style="dim"),
        *expert_table(counts, event.chars),
        Text(""),
        Text("lift, how much more often than its share: ░ <1  ▒ 1-2  ▓ 2-4  █ ≥4", style="dim"),
        *heat_map(counts, event.chars, width),
    ]
    return Text("\n").join(body)


class ExpertsScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("left", "layer(-1)", "Layer -"),
        Binding("right", "layer(1)", "Layer +"),
        Binding("escape,r,q", "close", "Close"),
    ]

    def __init__(self, view) -> None:
        super().__init__()
        self.view, self.shown_layer = view, 0

    def compose(self) -> ComposeResult:
        with Vertical(id="experts-screen", classes="dialog"):
            yield Static(id="experts-body")

    def on_mount(self) -> None:
        self.draw()
        self.set_interval(1.0, self.draw)  # a new evaluation shows while the screen is open

    def draw(self) -> None:
        event = self.view.expert_chars
        body = self.query_one("#experts-body", Static)
        if event is None:
            body.update(
                "which characters each expert takes is counted at each evaluation; none yet "
                "(press e for one now; runs recorded before moe-tui counted routes have none)"
            )
            return
        self.shown_layer %= len(event.counts)
        routing = self.view.routing
        entropy = (
            routing.layers[self.shown_layer].entropy if routing and len(routing.layers) > self.shown_layer else None
        )
        body.update(
            describe_layer(
                event, self.shown_layer, self.view.previous_expert_chars, self.size.width - 4, entropy, keys=" (← →)"
            )
        )

    def action_layer(self, step: int) -> None:
        self.shown_layer += step
        self.draw()

    def action_close(self) -> None:
        self.dismiss(None)
