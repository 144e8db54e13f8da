"""The loss chart: smoothed train loss as a braille line, eval train/val points on top.

Drawing cost depends on the widget's size, not the run's length: the history is bounded (see
`SeriesBuffer`) and is reduced to at most two points per character column before drawing.
"""

from __future__ import annotations

import math

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from tui.dashboard.history import bucket_means
from tui.dashboard.run_view import RunView
from tui.dashboard.widgets.braille import BrailleCanvas
from tui.dashboard.widgets.status import format_duration

RECENT_FRACTION = 0.25  # the recent window: the last quarter of the steps so far...
RECENT_MIN_STEPS = 100  # ...but never fewer than this many
LABEL_WIDTH = 6


def format_step(step: float) -> str:
    step = int(round(step))
    if step >= 100_000:
        return f"{step / 1000:.0f}k"
    if step >= 10_000:
        return f"{step / 1000:.1f}k"
    return str(step)


RUN_MARKS = "●■▲◆★✚"  # runs overlaid: a mark and a colour each, so NO_COLOR still tells them apart


class LossChart(Widget):
    COMPONENT_CLASSES = {
        "loss-chart--train",
        "loss-chart--eval-train",
        "loss-chart--val",
        "loss-chart--axis",
        "loss-chart--setting",
        *(f"loss-chart--run{i}" for i in range(len(RUN_MARKS))),
    }

    log_y = reactive(False)
    recent = reactive(False)
    by_time = reactive(False)

    def __init__(self, view: RunView, **kwargs) -> None:
        super().__init__(**kwargs)
        self.view = view
        self.overlay: list[tuple[str, RunView]] = []  # several runs: their validation curves

    def on_mount(self) -> None:
        self.update_titles()

    def refresh_from_state(self) -> None:
        self.refresh()

    def watch_log_y(self) -> None:
        self.update_titles()

    def watch_recent(self) -> None:
        self.update_titles()

    def watch_by_time(self) -> None:
        self.update_titles()

    def update_titles(self) -> None:
        modes = ["log-y" if self.log_y else "linear", "recent" if self.recent else "whole run"]
        if self.overlay:
            modes = ["val", "log-y" if self.log_y else "linear", "by time" if self.by_time else "by step"]
            self.border_subtitle = "  ".join(
                f"{RUN_MARKS[i % len(RUN_MARKS)]} {name}" for i, (name, _) in enumerate(self.overlay)
            )
        else:
            self.border_subtitle = "━ train  ○ eval train  ● val  ◉ both"
        self.border_title = f"loss, nats/char · {' · '.join(modes)}"

    def window_start(self) -> float | None:
        if not self.recent:
            return None
        start = self.view.run.start_step if self.view.run else 0
        done = self.view.step - start
        return self.view.step - max(RECENT_MIN_STEPS, done * RECENT_FRACTION)

    def render(self) -> Text:
        width, height = self.content_size.width, self.content_size.height
        if self.overlay:
            return self._draw_overlay(width - LABEL_WIDTH - 1, height - 1)
        since = self.window_start()
        train = self.view.train_loss.points(since)
        evals_t = self.view.eval_train.points(since)
        evals_v = self.view.eval_val.points(since)
        if not (train[0] or evals_v[0]):
            return Text("waiting for the first steps…", style=self.get_component_rich_style("loss-chart--axis"))
        plot_w, plot_h = width - LABEL_WIDTH - 1, height - 1
        if plot_w < 8 or plot_h < 2:
            latest = self.view.smoothed_loss
            return Text(f"loss {latest:.4f}" if latest is not None else "")
        return self._draw(train, evals_t, evals_v, plot_w, plot_h)

    def _draw(self, train, evals_t, evals_v, plot_w: int, plot_h: int) -> Text:
        canvas = BrailleCanvas(plot_w, plot_h)
        xs, ys = bucket_means(*train, canvas.dot_width)
        to_dot, (x_lo, x_hi), (y_lo, y_hi) = self._scale(
            canvas, xs + evals_t[0] + evals_v[0], ys + evals_t[1] + evals_v[1]
        )

        canvas.polyline(
            [to_dot(x, y) for x, y in zip(xs, ys)], self.get_component_rich_style("loss-chart--train", partial=True)
        )
        for (steps, values), char, part in (
            (evals_t, "○", "loss-chart--eval-train"),
            (evals_v, "●", "loss-chart--val"),
        ):
            style = self.get_component_rich_style(part, partial=True)
            for x, y in zip(steps, values):
                dot = to_dot(x, y)
                both = char == "●" and canvas.mark_at(*dot) == "○"  # train and val evals in one cell
                canvas.mark(*dot, "◉" if both else char, style)
        style = self.get_component_rich_style("loss-chart--setting", partial=True)
        for step in self.view.settings_steps:  # a setting changed here: marked along the top
            if x_lo <= step <= x_hi:
                fx = (step - x_lo) / (x_hi - x_lo) if x_hi > x_lo else 1.0
                canvas.mark(round(fx * (canvas.dot_width - 1)), 0, "▼", style)

        return self._frame(canvas, plot_h, y_lo, y_hi, format_step(x_lo), format_step(x_hi))

    def _scale(self, canvas: BrailleCanvas, xs: list[float], values: list[float]):
        """(point -> dot, the x range, the padded y range) for points spanning `xs` and `values`."""
        ys = [self._y(v) for v in values]
        x_lo, x_hi = min(xs), max(xs)
        y_lo, y_hi = min(ys), max(ys)
        pad = (y_hi - y_lo) * 0.05 or abs(y_hi) * 0.05 or 1.0
        y_lo, y_hi = y_lo - pad, y_hi + pad

        def to_dot(x: float, y: float) -> tuple[int, int]:
            fx = (x - x_lo) / (x_hi - x_lo) if x_hi > x_lo else 1.0
            fy = (self._y(y) - y_lo) / (y_hi - y_lo)
            return round(fx * (canvas.dot_width - 1)), round((1 - fy) * (canvas.dot_height - 1))

        return to_dot, (x_lo, x_hi), (y_lo, y_hi)

    def _frame(self, canvas: BrailleCanvas, plot_h: int, y_lo: float, y_hi: float, left: str, right: str) -> Text:
        """The canvas with its y labels on the left and the x range below."""
        axis = self.get_component_rich_style("loss-chart--axis")
        plot_w = canvas.width
        rows = []
        for r, row in enumerate(canvas.rows()):
            label = ""
            if r in (0, plot_h - 1) or (plot_h >= 5 and r == plot_h // 2):
                y_mid = y_hi - (y_hi - y_lo) * (r * 4 + 1.5) / canvas.dot_height  # the row's centre
                label = f"{self._unscale(y_mid):.3g}"
            rows.append(
                Text.assemble((label[:LABEL_WIDTH].rjust(LABEL_WIDTH), axis), ("┤" if label else "│", axis), row)
            )
        gap = max(1, plot_w - len(left) - len(right))
        rows.append(Text.assemble((" " * LABEL_WIDTH + "└" + left + "─" * gap + right, axis)))
        return Text("\n").join(rows)

    def _draw_overlay(self, plot_w: int, plot_h: int) -> Text:
        """Each run's validation curve, by step or by training seconds, one mark and colour per run."""
        series = [(m.eval_val_time if self.by_time else m.eval_val).points(None) for _, m in self.overlay]
        xs = [x for steps, _ in series for x in steps]
        if not xs or plot_w < 8 or plot_h < 2:
            return Text("waiting for the first evaluations…", style=self.get_component_rich_style("loss-chart--axis"))
        canvas = BrailleCanvas(plot_w, plot_h)
        to_dot, (x_lo, x_hi), (y_lo, y_hi) = self._scale(canvas, xs, [v for _, values in series for v in values])

        for i, (steps, values) in enumerate(series):
            style = self.get_component_rich_style(f"loss-chart--run{i % len(RUN_MARKS)}", partial=True)
            dots = [to_dot(x, y) for x, y in zip(steps, values)]
            canvas.polyline(dots, style)
            for dot in dots:
                canvas.mark(*dot, RUN_MARKS[i % len(RUN_MARKS)], style)
        return self._frame(
            canvas, plot_h, y_lo, y_hi, *(format_duration(v) if self.by_time else format_step(v) for v in (x_lo, x_hi))
        )

    def _y(self, value: float) -> float:
        return math.log10(max(value, 1e-9)) if self.log_y else value

    def _unscale(self, y: float) -> float:
        return 10**y if self.log_y else y
