"""`moe-tui report RUN [RUN ...]`: one self-contained HTML page (or PNG/SVG files) of runs, drawn from
their recorded events: loss against step and training time, learning rate, tokens/s, each expert's
share and the routing's drift over the run, the character x expert maps of the last evaluation, samples,
and the config; and, from each run's best checkpoint, each expert's importance, which experts are picked
together and how alike they are (tui/report_experts.py).

Charts are matplotlib figures, inlined as SVG; the page has no script and needs no server. Several
runs overlay their curves; the expert sections come per run.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Annotated, Optional

import typer

from moe_core.errors import UserError
from moe_core.events import EvalMetrics, ExpertChars, RouterStats, Sample, StepMetrics
from moe_core.routing import by_frequency, lift, shown, top_characters
from moe_core.store.runs import Run, default_runs_dir
from tui.options import DataDir, RunsDir
from tui.report_experts import Measured, chart, figures_for, measure, measured_html, over_time_html, pairs_of

FORMATS = ("html", "png", "svg")
PAGE_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; font-size: 13px; }
table { border-collapse: collapse; font-family: ui-monospace, monospace; font-size: 13px; }
.pairs, .importance { display: block; overflow-x: auto; }
td, th { padding: 2px 8px; border-bottom: 1px solid #eee; text-align: left; }
.chart svg { max-width: 100%; height: auto; }
#log-y:checked ~ .linear, #log-y:not(:checked) ~ .log { display: none; }
.absent { color: #a33; }
"""


class RunEvents:
    """One run's recorded events, by kind."""

    def __init__(self, run: Run):
        self.run, self.name = run, run.name
        events = run.events()
        self.steps = [e for e in events if isinstance(e, StepMetrics)]
        self.evals = [e for e in events if isinstance(e, EvalMetrics)]
        self.routing = [e for e in events if isinstance(e, RouterStats)]
        self.routes = [e for e in events if isinstance(e, ExpertChars)]
        self.samples = [e for e in events if isinstance(e, Sample)]


def report(
    runs: Annotated[list[str], typer.Argument(help="Runs to report on; several are overlaid")],
    out: Annotated[
        Optional[Path],
        typer.Option(help="The page to write \\[default: RUN/report.html]; with --format png or svg, a folder"),
    ] = None,
    format: Annotated[str, typer.Option(help="html | png | svg")] = "html",
    runs_dir: RunsDir = None,
    data_dir: DataDir = None,
) -> None:
    """Write a picture report of runs: loss curves, learning rate, speed, expert load, what the experts learned."""
    if format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    runs_dir = runs_dir or default_runs_dir()
    recorded = [RunEvents(Run.open(runs_dir, name)) for name in dict.fromkeys(runs)]
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            "moe-tui report draws with matplotlib, which is not installed; `pip install 'moe-tui[report]'`"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401 - closes the figures below

    from moe_core.data.corpus import default_data_dir

    measured = {
        r.name: measure(r.run, data_dir or default_data_dir(), not r.routes or r.routes[-1].pairs is None)
        for r in recorded
    }
    figures = build_figures(recorded, measured)
    if format == "html":
        target = out or recorded[0].run.path / "report.html"
        target.write_text(page(recorded, figures, measured), encoding="utf-8")
    else:
        target = out or recorded[0].run.path / "report"
        target.mkdir(parents=True, exist_ok=True)
        for name, (figure, _) in figures.items():
            figure.savefig(target / f"{name}.{format}", dpi=120, bbox_inches="tight")
    for figure, _ in figures.values():
        matplotlib.pyplot.close(figure)
    print(f"wrote {target}")


def build_figures(recorded: list[RunEvents], measured: dict[str, Measured]) -> dict:
    """name -> (figure, caption); the log-scale loss figure beside the linear one."""
    import matplotlib.pyplot as plt

    figures = {}
    for scale in ("linear", "log"):
        fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for i, r in enumerate(recorded):
            colour = f"C{i}"
            if len(recorded) == 1:
                by_step.plot(
                    [e.step for e in r.steps],
                    [e.loss for e in r.steps],
                    color="C0",
                    alpha=0.5,
                    lw=1,
                    label="train (per log window)",
                )
                by_step.plot(
                    [e.step for e in r.evals], [e.train_loss for e in r.evals], "o-", color="C1", label="eval train"
                )
            for axis, x in ((by_step, [e.step for e in r.evals]), (by_time, [e.elapsed for e in r.evals])):
                axis.plot(
                    x,
                    [e.val_loss for e in r.evals],
                    "o-",
                    color=colour if len(recorded) > 1 else "C3",
                    label=f"{r.name} val" if len(recorded) > 1 else "val",
                )
        by_step.set(xlabel="step", ylabel="loss, nats/char", yscale=scale)
        by_time.set(xlabel="training seconds", yscale=scale)
        by_step.legend()
        by_step.grid(alpha=0.3)
        by_time.grid(alpha=0.3)
        figures[f"loss-{scale}"] = (fig, "Loss against step and against training time")
    fig, (lr, speed) = plt.subplots(1, 2, figsize=(11, 3))
    for i, r in enumerate(recorded):
        lr.plot([e.step for e in r.steps], [e.lr for e in r.steps], color=f"C{i}", label=r.name)
        speed.plot([e.step for e in r.steps], [e.tokens_per_sec for e in r.steps], color=f"C{i}", label=r.name)
    lr.set(xlabel="step", ylabel="learning rate")
    speed.set(xlabel="step", ylabel="tokens/s")
    lr.legend()
    figures["schedule"] = (fig, "Learning rate and training speed")
    for r in recorded:
        last = last_routes(r, measured[r.name])
        if last is not None:
            figures[f"{r.name}-experts"] = (heat_figure(last), f"{r.name}: lift of each character for each expert")
        figures.update(figures_for(r.name, r.routing, r.routes, measured[r.name]))
    return figures


def last_routes(r: RunEvents, measured: Measured) -> ExpertChars | None:
    """The character x expert counts to draw: the last evaluation's, else the best checkpoint's."""
    return r.routes[-1] if r.routes else measured.routes


def heat_figure(event: ExpertChars):
    """Per layer, experts x characters (the most frequent first): the lift. Constrained layout gives the
    colour bar a column of its own, beside the maps and never over them."""
    import matplotlib.pyplot as plt

    layers = len(event.counts)
    fig, axes = plt.subplots(layers, 1, figsize=(11, 1.3 + 1.3 * layers), squeeze=False, layout="constrained")
    for layer, axis in enumerate(axes[:, 0]):
        counts = event.counts[layer]
        columns = by_frequency(counts)
        lifted = lift(counts)
        image = axis.imshow(
            [[lifted[i][e] for i in columns] for e in range(len(counts[0]))],
            aspect="auto",
            cmap="magma",
            vmin=0,
            vmax=4,
        )
        axis.set_xticks(range(len(columns)), [shown(event.chars[i]) for i in columns], fontsize=7)
        axis.set_yticks(range(len(counts[0])), [f"e{e}" for e in range(len(counts[0]))], fontsize=7)
        axis.set_ylabel(f"layer {layer + 1}")
    fig.colorbar(image, ax=axes[:, 0], label="lift", shrink=0.8)
    return fig


def page(recorded: list[RunEvents], figures: dict, measured: dict[str, Measured]) -> str:
    names = ", ".join(r.name for r in recorded)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>moe-tui report: {html.escape(names)}</title>"
        f"<style>{PAGE_STYLE}</style></head><body><h1>moe-tui report: {html.escape(names)}</h1>"
    ]
    parts.append("<h2>Loss</h2><input type='checkbox' id='log-y'><label for='log-y'> log scale</label>")
    for scale in ("linear", "log"):
        parts.append(chart(figures[f"loss-{scale}"][0], f"chart-loss-{scale}", scale))
    fig, caption = figures["schedule"]
    parts.append(f"<h2>{caption}</h2>{chart(fig, 'chart-schedule')}")
    for r in recorded:
        parts.append(f"<h2>{html.escape(r.name)}: experts</h2>")
        parts.append(over_time_html(r.name, figures))
        parts.append(lift_html(r, measured[r.name], figures))
        config = r.run.load_config()
        together = pairs_of(r.routes, measured[r.name])
        parts.append(measured_html(r.name, figures, measured[r.name], together, config.top_k, config.num_experts))
    for r in recorded:
        parts.append(f"<h2>{html.escape(r.name)}: samples</h2>")
        for sample in r.samples[-12:]:
            parts.append(f"<h3>step {sample.step}</h3><pre>{html.escape(sample.text)}</pre>")
        parts.append(
            f"<h2>{html.escape(r.name)}: config</h2><pre>"
            f"{html.escape(r.run.config_path.read_text(encoding='utf-8'))}</pre>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def lift_html(r: RunEvents, measured: Measured, figures: dict) -> str:
    """The character x expert lift maps and each expert's top characters, per layer."""
    parts = []
    if not r.routes:
        parts.append(
            "<p class='absent' id='no-expert-chars'>The expert-character data is absent from the events: this run "
            "was recorded before moe-tui counted which characters each expert takes."
            + (" The maps below are counted on its best checkpoint." if measured.routes else "")
            + "</p>"
        )
    last = last_routes(r, measured)
    if last is None:
        return "\n".join(parts)
    parts.append(f"<h3>What each expert takes (step {last.step})</h3>")
    parts.append(chart(figures[f"{r.name}-experts"][0], f"chart-experts-{r.name}"))
    for layer, counts in enumerate(last.counts):
        tops = [
            " ".join(f"{shown(c)} {v:.1f}" for c, v in top_characters(counts, last.chars, e))
            for e in range(len(counts[0]))
        ]
        rows = "".join(f"<tr><td>e{e}</td><td>{html.escape(top)}</td></tr>" for e, top in enumerate(tops))
        parts.append(
            f"<h4>layer {layer + 1}: top characters by lift (step {last.step})</h4>"
            f"<table class='experts' id='experts-layer-{layer + 1}'>{rows}</table>"
        )
    return "\n".join(parts)
