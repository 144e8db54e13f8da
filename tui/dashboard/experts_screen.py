"""What the experts learn, a screen over the dashboard (`r`): per layer (← →), each expert's top characters
by lift, a character x expert heat map and which experts go together (tui/render/experts.py); `i` measures
what switching each expert off costs and how alike their outputs are; `[` `]` step back and forth through
the run's evaluations.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from moe_core.events import ExpertChars, Probed
from moe_core.probe.request import ProbeRequest, new_request_id
from tui.render.experts import describe_layer


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
        self.at_step: int | None = None  # the evaluation shown, by its step; None: the latest
        self.asked = 0  # the request id of the importance probe sent from here
        self.note = ""

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="experts-screen", classes="dialog"):
            yield Static(id="experts-body")

    def on_mount(self) -> None:
        self.draw()
        self.set_interval(0.5, self.draw)  # a new evaluation, or a probe's answer, shows while the screen is open

    def position(self) -> int | None:
        """Where the evaluation shown is in the view's history (the one kept nearest before it, after a thinning)."""
        history = self.view.expert_history
        if self.at_step is None or not history:
            return None
        return max([i for i, e in enumerate(history) if e.step <= self.at_step] or [0])

    def shown(self) -> tuple[ExpertChars | None, ExpertChars | None]:
        """The evaluation on screen and the one before it."""
        at, history = self.position(), self.view.expert_history
        if at is None:
            return self.view.expert_chars, self.view.previous_expert_chars
        return history[at], history[at - 1] if at > 0 else None

    def answer(self) -> Probed | None:
        """The importance probe's answer once it came, else the view's latest measurement."""
        if self.asked and self.asked in self.view.answers:
            self.note = ""
        elif self.asked and (why := self.view.probe_refused(self.asked)):
            self.note = f"not measured: {why}"
        return self.view.answers.get(self.asked) or self.view.measured

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
        where = (
            "latest evaluation"
            if latest
            else f"evaluation {self.position() + 1} of {len(self.view.expert_history)} kept"
        )
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
        history, latest = self.view.expert_history, self.view.expert_chars
        if not history:
            return
        kept_last = history[-1] is latest  # the latest is kept unless the thinning's stride skips it
        current = self.position()
        if current is None:
            current = len(history) - (1 if kept_last else 0)
        at = max(0, current + step)
        following = at > len(history) - 1 or (at == len(history) - 1 and kept_last)
        self.at_step = None if following else history[at].step  # past the last: follow new evaluations
        self.draw()

    def action_importance(self) -> None:
        """Ask for each expert's importance and the experts' similarity: from the live trainer's weights,
        or from the latest checkpoint where no trainer is live."""
        source = getattr(self.app, "source", None)
        if source is None:
            self.note = "no model to probe here (a recorded stream)"
        elif not source.live and getattr(self.app, "local", None) is not None:
            self.note = "training here has ended: `moe-tui runs show RUN --experts` measures its best checkpoint"
        else:
            self.asked = new_request_id()
            source.probe(ProbeRequest(experts=True, request_id=self.asked))
            self.note = "measuring each expert's importance (every expert switched off in turn)..."
        self.draw()

    def action_close(self) -> None:
        self.dismiss(None)
