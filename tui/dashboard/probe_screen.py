"""The probe screen (`p`): route a text through the model and see, per layer (← →), which expert each
character goes to and the loss on it; switch experts off (0-9 in the layer shown, or type L:E ...), force
top-1 (t) or a capacity (c), and see at once the validation loss and a sample beside the unchanged model's.

On a live run the trainer answers from its weights as they are, between two steps; elsewhere (a viewer of
an ended run) the run's latest checkpoint answers. Drawn by tui/render/probe.py, as `moe-tui probe` is.
"""

from __future__ import annotations

from dataclasses import replace

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from moe_core.errors import UserError
from moe_core.events import Probed
from moe_core.probe.request import Intervention, ProbeRequest, new_request_id, parse_masks
from tui.render.probe import comparison, legend, routed_text, text_summary

CAPACITIES = (None, 1.0, 1.5, 0.5)  # c cycles through them: none is dropless evaluation
TEXT_KEPT = 600  # characters of the latest sample offered to probe when the screen opens


class ProbeScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("left", "layer(-1)", "Layer -"),
        Binding("right", "layer(1)", "Layer +"),
        Binding("slash", "edit('#probe-text')", "Text", key_display="/"),
        Binding("m", "edit('#probe-masks')", "Mask L:E"),
        Binding("t", "top_one", "Top-1"),
        Binding("c", "capacity", "Capacity"),
        Binding("u", "unchanged", "Unchanged"),
        Binding("escape", "close", "Close"),
        *(Binding(str(e), f"toggle({e})", show=False) for e in range(10)),
    ]

    def __init__(self, view, source) -> None:
        super().__init__()
        self.view, self.source = view, source
        config = source.settings()
        self.n_layers, self.n_experts, self.top_k = config.n_layer, config.num_experts, config.top_k
        self.shown_layer = 0
        self.change = Intervention()
        self.asked = 0
        self.answer: Probed | None = None
        self.note = ""

    def compose(self) -> ComposeResult:
        with Vertical(id="probe-screen", classes="dialog"):
            yield Input(
                self.first_text(),
                placeholder="text to route through the model, then Enter",
                id="probe-text",
                compact=True,
            )
            yield Input(
                placeholder="experts off: L:E ... (layer from 1, expert from 0), then Enter",
                id="probe-masks",
                compact=True,
            )
            with VerticalScroll():
                yield Static(id="probe-body")

    def first_text(self) -> str:
        """The latest sample, or a line the model knows, to start from."""
        if self.view.samples:
            return self.view.samples[0].text.strip("\n")[:TEXT_KEPT].replace("\n", " ")
        return ""

    def on_mount(self) -> None:
        self.set_interval(0.1, self.take_answer)
        if self.query_one("#probe-text", Input).value:
            self.ask()
            self.query_one(VerticalScroll).focus()

    # -- asking and answering -----------------------------------------------------------------------

    def ask(self) -> None:
        text = self.query_one("#probe-text", Input).value
        if not text and not self.change:
            self.note = "type a text to probe (/), then Enter"
            self.draw()
            return
        try:
            self.change.check(self.n_layers, self.n_experts, self.top_k)
            self.source.vocab.encode(text)
        except UserError as err:
            self.note = str(err)
            self.draw()
            return
        self.asked = new_request_id()
        self.source.probe(ProbeRequest(text=text, intervention=self.change, request_id=self.asked))
        self.note = f"probing{' with ' + self.change.describe() if self.change else ''}..."
        self.draw()

    def take_answer(self) -> None:
        answer = self.view.answers.get(self.asked)
        if answer is not None and answer is not self.answer:
            self.answer, self.note = answer, ""
            self.draw()
        elif answer is None and self.note.startswith("probing") and (why := self.view.probe_refused(self.asked)):
            self.note = f"no answer: {why}"
            self.draw()

    def draw(self) -> None:
        width = max(10, self.size.width - 6)
        parts = [
            Text(
                f"layer {self.shown_layer + 1}/{self.n_layers} (← →) · changed: {self.change.describe()} · "
                "0-9 switch an expert of this layer off/on, m type L:E, t top-1, c capacity, u unchanged",
                style="bold",
            )
        ]
        if self.note:
            parts.append(Text(self.note, style="italic"))
        event = self.answer
        if event is not None and event.text:
            where = "live weights" if event.source == "live" else f"checkpoint {event.source}"
            parts += [
                Text(f"{where} at step {event.step}", style="dim"),
                legend(self.n_experts),
                text_summary(event, self.shown_layer, self.n_experts),
                routed_text(event, self.shown_layer, width),
            ]
        if event is not None and event.val_loss is not None:
            parts += [Text(""), comparison(event)]
        self.query_one("#probe-body", Static).update(Text("\n").join(parts))

    # -- keys ---------------------------------------------------------------------------------------

    def on_input_submitted(self, message: Input.Submitted) -> None:
        if message.input.id == "probe-masks":
            try:
                masked = parse_masks(message.value, self.n_layers)
            except UserError as err:
                self.note = str(err)
                self.draw()
                return
            self.change = replace(self.change, masked=masked)
        self.query_one(VerticalScroll).focus()
        self.ask()

    def action_edit(self, which: str) -> None:
        self.query_one(which, Input).focus()

    def action_layer(self, step: int) -> None:
        self.shown_layer = (self.shown_layer + step) % self.n_layers
        self.draw()

    def action_toggle(self, expert: int) -> None:
        if expert >= self.n_experts:
            self.note = f"no expert {expert}: the layers have {self.n_experts} (0-{self.n_experts - 1})"
            self.draw()
            return
        pair = (self.shown_layer, expert)
        masked = tuple(m for m in self.change.masked if m != pair)
        if masked == self.change.masked:
            masked += (pair,)
        self.changed(replace(self.change, masked=masked))

    def action_top_one(self) -> None:
        top = None if self.change.top_k == 1 else 1
        self.changed(replace(self.change, top_k=top))

    def action_capacity(self) -> None:
        following = CAPACITIES[(CAPACITIES.index(self.change.capacity_factor) + 1) % len(CAPACITIES)]
        self.changed(replace(self.change, capacity_factor=following))

    def action_unchanged(self) -> None:
        self.changed(Intervention())

    def changed(self, change: Intervention) -> None:
        self.change = change
        self.query_one("#probe-masks", Input).value = " ".join(f"{layer + 1}:{e}" for layer, e in change.masked)
        self.ask()

    def action_close(self) -> None:
        self.dismiss(None)
