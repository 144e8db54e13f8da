"""What the experts learn, a screen over the dashboard (`r`): per layer (← →), each expert's top characters
by lift, a character x expert heat map and which experts go together (tui/render/experts.py); `i` measures
what switching each expert off costs and how alike their outputs are; `[` `]` step back and forth through
the run's evaluations.
"""

from __future__ import annotations

import random

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from moe_core.events import ExpertChars, Probed
from moe_core.probe.request import ProbeRequest
from tui.render.experts import describe_layer


def new_request_id() -> int:
    """A probe's answer goes to every viewer of the run: each asker knows its own by this."""
    return random.getrandbits(31)


class ExpertsScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("left", "layer(-1)", "Layer -"),
        Binding("right", "layer(1)", "Layer +"),
        Binding("left_square_bracket", "evaluation(-1)", "Earlier", key_display="["),
        Binding("right_square_bracket", "evaluation(1)", "Later", key_display="]"),
        Binding("i", "importance", "Importance"),
        Binding("escape,r,q", "close", "Close"),
    ]

    def __init__(self, view) -> None:
        super().__init__()
        self.view, self.shown_layer = view, 0
        self.at: int | None = None  # the evaluation shown, an index into the view's history; None: the latest
        self.asked = 0  # the request id of the importance probe sent from here
        self.note = ""

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="experts-screen", classes="dialog"):
            yield Static(id="experts-body")

    def on_mount(self) -> None:
        self.draw()
        self.set_interval(0.5, self.draw)  # a new evaluation, or a probe's answer, shows while the screen is open

    def shown(self) -> tuple[ExpertChars | None, ExpertChars | None]:
        """The evaluation on screen and the one before it."""
        history = self.view.expert_history
        if self.at is None or not history:
            return self.view.expert_chars, self.view.previous_expert_chars
        self.at = max(0, min(self.at, len(history) - 1))
        return history[self.at], history[self.at - 1] if self.at > 0 else None

    def answer(self) -> Probed | None:
        """The importance probe's answer, once it came (any earlier one of this view's otherwise)."""
        probed = self.view.probed
        if probed is not None and probed.importance is None and probed.similarity is None:
            return None  # a probe of a text, asked elsewhere
        if probed is not None and self.asked and probed.request_id == self.asked:
            self.note = ""
        return probed

    def draw(self) -> None:
        event, previous = self.shown()
        body = self.query_one("#experts-body", Static)
        if event is None:
            body.update(
                "which characters each expert takes is counted at each evaluation; none yet "
                "(press e for one now; runs recorded before moe-tui counted routes have none)"
            )
            return
        self.shown_layer %= len(event.counts)
        routing = self.view.routing
        latest = event is self.view.expert_chars
        entropy = (
            routing.layers[self.shown_layer].entropy
            if latest and routing and len(routing.layers) > self.shown_layer
            else None
        )
        where = "latest evaluation" if latest else f"evaluation {self.at + 1} of {len(self.view.expert_history)} kept"
        text = describe_layer(
            event, self.shown_layer, previous, self.size.width - 4, entropy, f" (← →) · {where} ([ ])", self.answer()
        )
        if self.note:
            text.append(f"\n{self.note}", style="italic")
        body.update(text)

    def action_layer(self, step: int) -> None:
        self.shown_layer += step
        self.draw()

    def action_evaluation(self, step: int) -> None:
        history = self.view.expert_history
        if history:
            self.at = (len(history) - 1 if self.at is None else self.at) + step
            if self.at >= len(history) - 1:
                self.at = None  # back at the latest: follow new evaluations again
            self.draw()

    def action_importance(self) -> None:
        """Ask for each expert's importance and the experts' similarity: from the live trainer's weights,
        or from the latest checkpoint where no trainer is live."""
        source = getattr(self.app, "source", None)
        if source is None:
            self.note = "no model to probe here (a recorded stream)"
        else:
            self.asked = new_request_id()
            source.probe(ProbeRequest(experts=True, request_id=self.asked))
            self.note = "measuring each expert's importance (every expert switched off in turn)..."
        self.draw()

    def action_close(self) -> None:
        self.dismiss(None)
