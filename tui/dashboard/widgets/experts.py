"""Expert utilisation: per layer, each expert's share of routed tokens against the ideal 1/E.

Two layouts, picked by the room available: a bar per expert (with the 1/E marker) when every layer's
bars fit, otherwise one heat-strip row per layer (one block per expert, half height = ideal share).
"""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

from moe_core.events import LayerRouting
from tui.dashboard.run_view import RunView

EIGHTHS = " ▏▎▍▌▋▊▉█"
HEIGHTS = " ▁▂▃▄▅▆▇█"
BALANCED_WITHIN = 0.25  # an expert within ±25% of the ideal share counts as balanced


def layer_summary(layer: LayerRouting) -> str:
    return f"cv {layer.imbalance:.2f}  dropped {layer.dropped_fraction:.1%}"


def hbar(fraction: float, width: int) -> str:
    """A bar `fraction` (0..1) of `width` cells long, in eighths of a cell."""
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (EIGHTHS[part] if part else "")).ljust(width)


class ExpertPanel(Widget):
    COMPONENT_CLASSES = {
        "expert-panel--over",
        "expert-panel--under",
        "expert-panel--even",
        "expert-panel--ideal",
        "expert-panel--label",
    }

    def __init__(self, view: RunView, **kwargs) -> None:
        super().__init__(**kwargs)
        self.view = view

    def on_mount(self) -> None:
        self.border_title = "experts · token share"

    def refresh_from_state(self) -> None:
        routing = self.view.routing
        if routing is not None and routing.layers:
            self.border_subtitle = f"ideal {100 / len(routing.layers[0].expert_fraction):.3g}% · step {routing.step}"
        self.refresh()

    def render(self) -> Text:
        routing = self.view.routing
        if routing is None or not routing.layers:
            return Text("waiting for router statistics…", style=self.get_component_rich_style("expert-panel--label"))
        layers = routing.layers
        n_experts = len(layers[0].expert_fraction)
        if n_experts == 1:
            return Text("dense model: one expert per layer, nothing to route")
        width, height = self.content_size.width, self.content_size.height
        if len(layers) * (n_experts + 1) <= height and width >= 30:
            return self._bars(layers, width)
        return self._strips(layers, width, height)

    def _style_for(self, share: float, ideal: float):
        part = (
            "expert-panel--over"
            if share > ideal * (1 + BALANCED_WITHIN)
            else "expert-panel--under"
            if share < ideal * (1 - BALANCED_WITHIN)
            else "expert-panel--even"
        )
        return self.get_component_rich_style(part, partial=True)

    def _bars(self, layers: list[LayerRouting], width: int) -> Text:
        label = self.get_component_rich_style("expert-panel--label", partial=True)
        ideal_style = self.get_component_rich_style("expert-panel--ideal", partial=True)
        n = len(layers[0].expert_fraction)
        ideal = 1 / n
        name_w = len(f"e{n - 1}") + 1
        bar_w = max(4, width - name_w - 7)
        scale = max(2 * ideal, *(max(layer.expert_fraction) for layer in layers))  # full bar = this share
        marker = min(bar_w - 1, int(ideal / scale * bar_w))
        lines = []
        for i, layer in enumerate(layers):
            lines.append(Text(f"layer {i}  {layer_summary(layer)}", style=label))
            for e, share in enumerate(layer.expert_fraction):
                bar = hbar(share / scale, bar_w)
                # The 1/E marker: a thin line where the bar does not reach, a dark notch where it does.
                tick = "│" if bar[marker] == " " else "┃"
                lines.append(
                    Text.assemble(
                        (f"e{e}".rjust(name_w - 1) + " ", label),
                        (bar[:marker], self._style_for(share, ideal)),
                        (tick, ideal_style),
                        (bar[marker + 1 :], self._style_for(share, ideal)),
                        (f"{share:6.1%}", label),
                    )
                )
        return Text("\n").join(lines)

    def _strips(self, layers: list[LayerRouting], width: int, height: int) -> Text:
        label = self.get_component_rich_style("expert-panel--label", partial=True)
        n = len(layers[0].expert_fraction)
        ideal = 1 / n
        summaries = [f"cv {layer.imbalance:.2f} drop {layer.dropped_fraction:.0%}" for layer in layers]
        room = width - 4 - max(len(text) for text in summaries)
        cell = max(1, min(3, room // n))  # wider blocks when there is room
        lines = []
        for i, layer in enumerate(layers):
            row = Text.assemble((f"L{i} ", label), no_wrap=True, overflow="crop")
            for share in layer.expert_fraction:
                level = round(min(1.0, share / (2 * ideal)) * 8)  # the ideal share is a half block
                block = HEIGHTS[max(1, level)] * (cell - 1 if cell > 1 else 1)
                row.append(block, self._style_for(share, ideal))
                if cell > 1:
                    row.append(" ")  # a gap keeps neighbouring experts apart
            row.append(f" {summaries[i]}", label)
            lines.append(row)
        if height > len(layers) + 1:
            # Short enough for an 80-column screen; the ideal share itself is in the border.
            legend = Text(f"block per expert; {HEIGHTS[4]} = ideal", style=label, no_wrap=True, overflow="ellipsis")
            lines += [Text(""), legend]
        return Text("\n").join(lines)
