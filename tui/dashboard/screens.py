"""Modal screens over the dashboard: quit confirmation, the sample and settings dialogs, the help screen."""

from __future__ import annotations

from typing import Callable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from moe_core.config import LIVE_KEYS, Config
from moe_core.errors import UserError
from moe_core.model.request import SampleRequest
from moe_core.train.settings import parse_assignments


class ConfirmQuit(ModalScreen[bool]):
    BINDINGS = [Binding("y,enter", "answer(True)", "Quit"), Binding("n,escape", "answer(False)", "Cancel")]

    def __init__(self, message: str, yes: str = "Quit (y)") -> None:
        super().__init__()
        self.message, self.yes = message, yes

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm", classes="dialog"):
            yield Label(self.message, id="confirm-message")
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.yes, variant="error", id="yes", compact=True)
                yield Button("Cancel (n)", id="no", compact=True)

    def on_mount(self) -> None:
        self.query_one("#yes", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


def encode_prompt(typed: str) -> str:
    """One-line input to prompt text: `\\n` stands for a newline (most corpora start lines after one)."""
    return typed.replace("\\n", "\n").replace("\\t", "\t")


def show_prompt(prompt: str) -> str:
    return prompt.replace("\n", "\\n").replace("\t", "\\t")


class FormDialog(ModalScreen):
    """A dialog of inputs with Go and Cancel: Enter or Go submits (`submit`), Escape or Cancel dismisses."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def on_input_submitted(self) -> None:
        self.submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "go":
            self.submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def submit(self) -> None:
        raise NotImplementedError


class SampleDialog(FormDialog):
    """Prompt, length, temperature and top-k; Enter samples, Escape cancels."""

    def __init__(self, last: SampleRequest, check: Callable[[SampleRequest], None]) -> None:
        super().__init__()
        self.last = last
        self.check = check  # raises UserError for a request the model cannot take

    def compose(self) -> ComposeResult:
        last = self.last
        with Vertical(id="sample-dialog", classes="dialog"):
            yield Label("Sample from the model now (\\n = newline)", classes="dialog-title")
            with Grid(id="sample-fields"):
                yield Label("prompt")
                yield Input(show_prompt(last.prompt), id="prompt", compact=True)
                yield Label("length")
                yield Input(str(last.max_new_tokens), id="length", compact=True, type="integer")
                yield Label("temperature")
                yield Input(f"{last.temperature:g}", id="temperature", compact=True, type="number")
                yield Label("top-k")
                yield Input(
                    "" if last.top_k is None else str(last.top_k),
                    id="top-k",
                    compact=True,
                    type="integer",
                    placeholder="all",
                )
            yield Static("", id="sample-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Sample (enter)", variant="primary", id="go", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#prompt", Input).focus()

    def submit(self) -> None:
        value = {i.id: i.value.strip() for i in self.query(Input)}
        try:
            request = SampleRequest(
                prompt=encode_prompt(self.query_one("#prompt", Input).value),
                max_new_tokens=_number(value["length"], int, "length"),
                temperature=_number(value["temperature"], float, "temperature"),
                top_k=_number(value["top-k"], int, "top-k") if value["top-k"] else None,
            )
            self.check(request)
        except UserError as err:
            self.query_one("#sample-error", Static).update(str(err))
            return
        self.dismiss(request)


class AddRunDialog(ModalScreen["str | None"]):
    """A viewer's `a` key: the name of another run to overlay."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, check: Callable[[str], None]) -> None:
        super().__init__()
        self.check = check  # raises UserError for a name that is not a run here

    def compose(self) -> ComposeResult:
        with Vertical(id="add-run", classes="dialog"):
            yield Label("Add a run to the chart (see `moe-tui runs`)", classes="dialog-title")
            yield Input(id="run-name", compact=True, placeholder="run name")
            yield Static("", id="add-run-error")

    def on_mount(self) -> None:
        self.query_one("#run-name", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        name = event.value.strip()
        try:
            self.check(name)
        except UserError as err:
            self.query_one("#add-run-error", Static).update(str(err))
            return
        self.dismiss(name)

    def action_cancel(self) -> None:
        self.dismiss(None)


def _number(text: str, kind: type, name: str):
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"{name} must be a number, got {text!r}") from None


HELP = """\
[b]moe-tui[/b]: a sparse Mixture-of-Experts language model, training live

[b]space[/b]   pause / resume (training stops within one step)
[b]s[/b]       sample now: prompt, length, temperature, top-k
[b]c[/b]       save a checkpoint now
[b]e[/b]       evaluate now (train and validation loss)
[b]o[/b]       settings: change lr, loss weights, dropout, intervals... live
[b]f[/b]       paused: fork here, a new run from this step with other settings
[b]r[/b]       what the experts learn: characters, pairs, [ ] over time, i importance
[b]p[/b]       probe: route a text, switch experts off (0-9), compare
[b]k[/b]       samples coloured by expert: layer 1, 2, ... then plain
[b]l[/b]       loss chart: linear / logarithmic y axis
[b]w[/b]       loss chart: whole run / the recent quarter of the steps
[b]q[/b]       quit: asks, saves a checkpoint, prints the resume command
          (watching with `moe-tui watch`: leaves; training goes on)
[b]ctrl+c[/b]  quit at once (saves too; a lost connection keeps training)
[b]S[/b]       watching: stop the run (asks; its trainer saves and exits)
[b]n a x[/b]   watching: next run, add a run, x axis by step / time
[b]tab[/b]     next panel; arrows and page keys scroll it
[b]?[/b]       this help

[b]Loss[/b]: ━ smoothed train loss, ○ eval train, ● validation, ◉ both (nats/char);
▼ along the top: a setting changed there.
[b]Experts[/b]: each expert's share of its layer's routed tokens; │ marks
the ideal 1/E. cv: coefficient of variation of the shares (0 = balanced);
dropped: share of assignments over capacity. Small terminals show one row
per layer, where a half block ▄ is the ideal share.

[dim]press any key to close[/dim]"""


class HelpScreen(ModalScreen[None]):
    def compose(self) -> ComposeResult:
        with Vertical(id="help", classes="dialog"):
            yield Static(HELP, id="help-text")

    def on_key(self, event) -> None:
        event.stop()
        self.dismiss(None)


class SettingsDialog(FormDialog):
    """The `o` key: the live settings with their values now, and one line of KEY=VALUE changes."""

    def __init__(self, current: Config, check: Callable[[dict], dict], title: str = "") -> None:
        super().__init__()
        self.current, self.title = current, title or "Change settings between two steps (KEY=VALUE ...)"
        self.check = check  # the changes, typed and checked; raises UserError

    def compose(self) -> ComposeResult:
        now = "  ".join(f"{key}={getattr(self.current, key):g}" for key in LIVE_KEYS)
        with Vertical(id="settings-dialog", classes="dialog"):
            yield Label(self.title, classes="dialog-title")
            yield Static(now, id="settings-now")
            yield Input(id="settings", compact=True, placeholder="e.g. lr=1e-3 aux_loss_coef=0.02")
            yield Static("", id="settings-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Apply (enter)", variant="primary", id="go", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#settings", Input).focus()

    def submit(self) -> None:
        try:
            changes = self.check(parse_assignments(self.query_one("#settings", Input).value.split()))
        except UserError as err:
            self.query_one("#settings-error", Static).update(str(err))
            return
        self.dismiss(changes)
