"""The header: what is training where, how far along it is, and the trainer's state."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

from moe_core.events import State
from tui.dashboard.run_view import RunView

STATE_LABELS = {state: state.value.upper() for state in State}  # and a pending request's own, upper-cased


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def format_count(n: float) -> str:
    return (
        f"{n / 1e6:.2f}M"
        if n >= 1e6
        else f"{n / 1e3:.0f}k"
        if n >= 1e4
        else f"{n / 1e3:.1f}k"
        if n >= 1e3
        else f"{n:.0f}"
    )


class StatusBar(Widget):
    """Two lines, redrawn in place (a Static's update() would re-lay the whole screen out each time)."""

    COMPONENT_CLASSES = {
        "status-bar--name",
        "status-bar--dim",
        "status-bar--pending",
        *(f"status-bar--{state}" for state in STATE_LABELS),
    }

    def __init__(self, view: RunView, **kwargs) -> None:
        super().__init__(**kwargs)
        self.view = view
        self.position: tuple[int, int] | None = None  # (run in focus, runs on screen) when watching several

    def refresh_from_state(self) -> None:
        self.refresh()

    def render(self) -> Text:
        width = self.content_size.width
        return Text("\n").join([fit(self._identity(), width), fit(self._progress(), width)])

    def _identity(self) -> list[Text]:
        s, dim = self.view, self.get_component_rich_style("status-bar--dim", partial=True)
        if s.run is None:
            return [Text("starting…", style=dim)]
        r = s.run
        parts = [Text(f"[{self.position[0]}/{self.position[1]}] ", dim)] if self.position else []
        parts += [
            Text(r.run_name, self.get_component_rich_style("status-bar--name", partial=True)),
            Text(f" · {r.dataset} · {r.device}", dim),
            Text(f" · {format_count(r.params_total)} params ({format_count(r.params_active)} active)"),
        ]
        if s.smoothed_loss is not None:
            parts.append(Text(f" · loss {s.smoothed_loss:.3f}"))
        if s.last_eval is not None:
            best = "" if s.last_eval.val_loss <= s.best_val else f" (best {s.best_val:.3f})"
            parts.append(Text(f" · val {s.last_eval.val_loss:.3f}{best}"))
        return parts

    def _progress(self) -> list[Text]:
        s, dim = self.view, self.get_component_rich_style("status-bar--dim", partial=True)
        parts = [
            Text(
                f" {STATE_LABELS.get(s.state, s.state.upper())} ",
                self.get_component_rich_style(f"status-bar--{s.state}", partial=True),
            )
        ]
        if s.pending:
            parts.append(Text(f" {s.pending}…", self.get_component_rich_style("status-bar--pending", partial=True)))
        parts.append(Text(f" step {s.step}/{s.max_iters}"))
        if s.max_iters:
            parts.append(Text(f" ({s.step / s.max_iters:.0%})", dim))
        parts.append(Text(f" · {format_duration(s.elapsed)}"))
        eta = s.eta_seconds
        if eta is not None:
            parts.append(Text(f" · ETA {format_duration(eta)}"))
        if s.metrics is not None:
            parts.append(Text(f" · {format_count(s.metrics.tokens_per_sec)} tok/s"))
        if s.usage is not None:
            parts.append(Text(f" · {describe_usage(s.usage)}", dim))
        if s.metrics is not None:
            parts.append(Text(f" · lr {s.metrics.lr:.2e}"))
        return parts


def describe_usage(u) -> str:
    """The training process's CPU, memory and GPU, e.g. `cpu 195% · 412 MB · gpu 87% 3.2 GB`."""
    text = f"cpu {u.cpu_percent:.0f}% · {format_bytes(u.rss_bytes)}"
    if u.gpu_memory_bytes is not None:
        gpu = f"{u.gpu_percent:.0f}% " if u.gpu_percent is not None else ""
        text += f" · gpu {gpu}{format_bytes(u.gpu_memory_bytes)}"
    return text


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def fit(parts: list[Text], width: int) -> Text:
    """The parts, most important first, as many as fit in one line (the rest are dropped, not wrapped)."""
    line = Text(no_wrap=True, overflow="ellipsis")
    for i, part in enumerate(parts):
        if i and line.cell_len + part.cell_len > width:
            break
        line.append_text(part)
    return line
