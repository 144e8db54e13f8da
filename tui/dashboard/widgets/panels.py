"""The text panels: generated samples (newest first) and the events log (evals, checkpoints, notices)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from moe_core.events import Sample
from tui.dashboard.run_view import RunView
from tui.render.probe import COLOURS

LOG_LEVEL_MARKS = {"info": "·", "eval": "≈", "checkpoint": "✓", "setting": "▼", "warning": "!", "error": "✗"}


class TextPanel(VerticalScroll):
    """A scrollable, wrapping text body rebuilt from the state when its part changes."""

    COMPONENT_CLASSES = {"text-panel--heading", "text-panel--dim", "text-panel--warning", "text-panel--error"}

    def __init__(self, view: RunView, title: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.view = view
        self.border_title = title
        self.body = Static(classes="panel-body")

    def compose(self) -> ComposeResult:
        yield self.body

    def refresh_from_state(self) -> None:
        self.body.update(self.build())

    def build(self) -> Text:
        raise NotImplementedError

    def style(self, part: str):
        return self.get_component_rich_style(f"text-panel--{part}", partial=True)


class SamplesPanel(TextPanel):
    def build(self) -> Text:
        if not self.view.samples:
            return Text("samples appear every --sample-interval steps; press s for one now", style=self.style("dim"))
        parts = []
        layer = self.view.sample_layer
        for sample in self.view.samples:
            origin = "yours" if sample.requested else "periodic"
            heading = Text(f"step {sample.step} · {origin} · T={sample.temperature:g}", style=self.style("heading"))
            if layer is not None:
                heading.append(f" · coloured by expert, layer {layer + 1} (k)" if sample.experts else " · not routed")
            parts.append(Text("\n").join([heading, self.coloured(sample, layer)]))
        return Text("\n\n").join(parts)

    @staticmethod
    def coloured(sample: Sample, layer: int | None) -> Text:
        """The sample's text, each character coloured by the expert it went to in `layer` (None: plain)."""
        start = len(sample.text) - len(sample.text.lstrip("\n"))
        text = sample.text.strip("\n")
        if not text:
            return Text("(empty)")
        if layer is None or not sample.experts or layer >= len(sample.experts):
            return Text(text)
        chosen = sample.experts[layer][start:]
        body = Text()
        for char, e in zip(text, chosen):
            body.append(char, style=f"bold {COLOURS[e % len(COLOURS)]}")
        return body


class EventsLog(TextPanel):
    def build(self) -> Text:
        if not self.view.log:
            return Text("no events yet", style=self.style("dim"))
        lines = []
        for line in self.view.log:
            style = self.style(line.level) if line.level in ("warning", "error") else None
            lines.append(
                Text.assemble(
                    (f"{line.step:>6} ", self.style("dim")),
                    (f"{LOG_LEVEL_MARKS.get(line.level, '·')} {line.text}", style),
                )
            )
        return Text("\n").join(lines)
