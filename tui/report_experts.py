"""The report's expert sections beyond the lift maps: each expert's share and the routing's drift over the
whole run, and, measured on the run's best checkpoint, each expert's importance (the validation-loss rise
with it alone switched off), which experts are picked together and how alike their outputs are.

Importance and similarity come from moe_core/probe, the numbers `moe-tui runs show RUN --experts` and
the experts screen show; co-activation from the last evaluation's counts (or the checkpoint's, for a run
recorded before they were counted). Every figure is laid out by matplotlib's constrained layout, which
gives each colour bar a place of its own beside the maps.
"""

from __future__ import annotations

import html
import io
import math
from dataclasses import dataclass
from pathlib import Path

from moe_core.errors import UserError
from moe_core.events import ExpertChars, Probed, RouterStats
from moe_core.routing import co_activation, expert_shares, routing_change

GRID_COLUMNS = 4  # layer panels per row: four fit the page's width at a readable size

READING = (
    "How to read them: a row is an expert. <b>Picked together</b>: of e_row's tokens, the share that also "
    "went to e_col; a high value marks two experts that work on the same tokens as a pair. <b>Alike</b>: the "
    "cosine of the two experts' outputs on the same tokens; near 1, they compute the same thing and one of "
    "them is redundant; near 0, they do different jobs."
)


@dataclass(frozen=True)
class Measured:
    """What a run's best checkpoint says of its experts, or why nothing."""

    probed: Probed | None = None
    routes: ExpertChars | None = None  # counted from the checkpoint, for runs whose events lack the pairs
    absent: str = ""


def measure(run, data_dir: Path, need_routes: bool) -> Measured:
    """Probe the best checkpoint on the run's evaluation batches (seconds on the `cpu` preset)."""
    from moe_core.probe.request import ProbeRequest  # torch: the report runs the model here alone
    from moe_core.probe.source import SavedModel

    try:
        saved = SavedModel.load(run, "best", data_dir)
        return Measured(saved.probe(ProbeRequest(experts=True)), saved.routes() if need_routes else None)
    except UserError as err:
        return Measured(absent=str(err))


def chart(figure, id: str, kind: str = "") -> str:
    """The figure inlined as SVG, in a div the page's style scales to its width (`kind`: a class more)."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    classes = f"chart {kind}".strip()
    return f"<div class='{classes}' id='{html.escape(id)}'>{text[text.index('<svg') :]}</div>"


def colour(e: int, experts: int):
    import matplotlib.pyplot as plt

    return f"C{e}" if experts <= 10 else plt.get_cmap("tab20")(e % 20)


def layer_grid(layers: int, width: float = 2.9, height: float = 2.6, **shared):
    """A figure with a panel per layer, GRID_COLUMNS to a row; returns it and the layers' axes."""
    import matplotlib.pyplot as plt

    columns = min(layers, GRID_COLUMNS)
    rows = math.ceil(layers / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(width * columns, height * rows), squeeze=False, layout="constrained", **shared
    )
    flat = list(axes.ravel())
    for axis in flat[layers:]:
        axis.remove()
    return fig, flat[:layers]


def annotate(axis, matrix: list[list[float]], form: str, limit: float, size: float) -> None:
    """Each cell's value written on it, white on the strong colours."""
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if not math.isnan(value):
                strong = abs(value) > 0.6 * limit
                axis.text(
                    j,
                    i,
                    form.format(value),
                    ha="center",
                    va="center",
                    fontsize=size,
                    color="white" if strong else "black",
                )


# -- over time, from the recorded events ------------------------------------------------------


def shares_figure(routing: list[RouterStats], routes: list[ExpertChars]):
    """Per layer, each expert's share of the routings: a line over the training batches (each log
    window), a dot at each evaluation (its validation batches)."""
    layers = len(routing[0].layers) if routing else len(routes[0].counts)
    fig, axes = layer_grid(layers, sharey=True)
    for layer, axis in enumerate(axes):
        if routing:
            steps = [e.step for e in routing]
            fractions = list(zip(*[e.layers[layer].expert_fraction for e in routing]))
            for e, share in enumerate(fractions):
                axis.plot(steps, share, color=colour(e, len(fractions)), lw=1, alpha=0.7, label=f"e{e}")
        if routes:
            steps = [e.step for e in routes]
            shares = list(zip(*[expert_shares(e.counts[layer]) for e in routes]))
            for e, share in enumerate(shares):
                label = None if routing else f"e{e}"
                axis.plot(steps, share, "o", ms=3.5, color=colour(e, len(shares)), label=label)
        axis.set(title=f"layer {layer + 1}", xlabel="step")
        axis.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)  # once all are drawn: the shared top fits every layer's lines
    axes[0].set_ylabel("share of the routings")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    return fig


def drift(routes: list[ExpertChars]) -> list[list[float]]:
    """Per layer, how far the routing moved from each evaluation to the next (moe_core.routing)."""
    return [
        [routing_change(before.counts[layer], after.counts[layer]) for before, after in zip(routes, routes[1:])]
        for layer in range(len(routes[0].counts))
    ]


def drift_figure(routes: list[ExpertChars]):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    fig, axis = plt.subplots(figsize=(11, 3), layout="constrained")
    steps = [e.step for e in routes[1:]]
    for layer, moved in enumerate(drift(routes)):
        axis.plot(steps, moved, "o-", ms=3.5, label=f"layer {layer + 1}")
    axis.set(xlabel="step", ylabel="moved since the evaluation before")
    axis.set_ylim(bottom=0)
    axis.yaxis.set_major_formatter(PercentFormatter(1.0))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return fig


# -- measured on the best checkpoint ----------------------------------------------------------


def importance_figure(importance: list[list[float]]):
    """Layer x expert: the validation-loss rise with that expert alone off (red: the loss rises)."""
    import matplotlib.pyplot as plt

    layers, experts = len(importance), len(importance[0])
    fig, axis = plt.subplots(figsize=(1.6 + 0.8 * experts, 1.0 + 0.5 * layers), layout="constrained")
    limit = max(abs(v) for row in importance for v in row) or 1.0
    image = axis.imshow(importance, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    annotate(axis, importance, "{:+.3f}", limit, 8)
    axis.set_xticks(range(experts), [f"e{e}" for e in range(experts)])
    axis.set_yticks(range(layers), [f"layer {layer + 1}" for layer in range(layers)])
    fig.colorbar(image, ax=axis, label="loss rise, nats/char")
    return fig


def pair_figure(matrices: list[list[list[float]]], label: str, cmap: str, low: float, high: float):
    """Per layer, an expert x expert map; the diagonal (an expert with itself) left blank."""
    fig, axes = layer_grid(len(matrices))
    for layer, (axis, matrix) in enumerate(zip(axes, matrices)):
        experts = len(matrix)
        blank = [[math.nan if i == j else v for j, v in enumerate(row)] for i, row in enumerate(matrix)]
        image = axis.imshow(blank, cmap=cmap, vmin=low, vmax=high)
        annotate(axis, blank, "{:.2f}", max(abs(low), abs(high)), 8 if experts <= 6 else 6)
        names = [f"e{e}" for e in range(experts)]
        axis.set_xticks(range(experts), names, fontsize=7)
        axis.set_yticks(range(experts), names, fontsize=7)
        axis.set_title(f"layer {layer + 1}")
    fig.colorbar(image, ax=axes, label=label, shrink=0.9)
    return fig


def pairs_of(routes: list[ExpertChars], measured: Measured) -> list[list[list[float]]] | None:
    """Per layer, the co-activation shares: of the last evaluation, else of the checkpoint."""
    if routes and routes[-1].pairs is not None:
        return [co_activation(pairs) for pairs in routes[-1].pairs]
    if measured.routes is not None and measured.routes.pairs is not None:
        return [co_activation(pairs) for pairs in measured.routes.pairs]
    return None


def figures_for(name: str, routing: list[RouterStats], routes: list[ExpertChars], measured: Measured) -> dict:
    """name -> (figure, caption) of one run's expert sections."""
    figures = {}
    if routing or routes:
        figures[f"{name}-load"] = (shares_figure(routing, routes), f"{name}: each expert's share of the routings")
    if len(routes) >= 2:
        figures[f"{name}-drift"] = (drift_figure(routes), f"{name}: how far the routing moved between evaluations")
    probed = measured.probed
    if probed is not None and probed.importance:
        figures[f"{name}-importance"] = (importance_figure(probed.importance), f"{name}: each expert's importance")
    together = pairs_of(routes, measured)
    if together and len(together[0]) > 1:
        top = max(v for matrix in together for row in matrix for v in row) or 1.0
        figures[f"{name}-together"] = (
            pair_figure(together, "share of e_row's tokens", "Blues", 0.0, top),
            f"{name}: experts picked together",
        )
    if probed is not None and probed.similarity and len(probed.similarity[0]) > 1:
        figures[f"{name}-alike"] = (
            pair_figure(probed.similarity, "cosine of the outputs", "RdBu_r", -1.0, 1.0),
            f"{name}: how alike the experts' outputs are",
        )
    return figures


# -- the page ---------------------------------------------------------------------------------


def over_time_html(name: str, figures: dict) -> str:
    parts = []
    if f"{name}-load" in figures:
        parts.append(
            f"<h3>Each expert's share of the routings over the run</h3><p>Lines: the training batches, each log "
            f"window; dots: the validation batches, at each evaluation.</p>"
            f"{chart(figures[f'{name}-load'][0], f'chart-load-{name}')}"
        )
    if f"{name}-drift" in figures:
        parts.append(
            "<h3>How far the routing moved between evaluations</h3><p>Per layer, the share of the "
            "characters' routings that went to other experts than at the evaluation before (weighted by "
            "how often each character occurs): high while the experts take shape, near 0 once they settle.</p>"
            f"{chart(figures[f'{name}-drift'][0], f'chart-drift-{name}')}"
        )
    return "\n".join(parts)


def measured_html(name: str, figures: dict, measured: Measured, together, top_k: int, num_experts: int) -> str:
    """The importance, co-activation and similarity sections of one run."""
    probed, tag = measured.probed, html.escape(name)
    parts = ["<h3>Each expert's importance</h3>"]
    if probed is None:
        parts.append(f"<p class='absent' id='no-probe-{tag}'>Not measured: {html.escape(measured.absent)}</p>")
    elif probed.importance is None:
        parts.append(
            f"<p class='absent' id='no-importance-{tag}'>Not measured: each token goes to {top_k} of the "
            f"{num_experts} experts, so switching one off would leave too few for the router to choose from.</p>"
        )
    else:
        parts.append(
            f"<p>How much the validation loss (nats/char) rises when that expert alone is switched off and the "
            f"router picks among the others; measured on the best checkpoint (step {probed.step}, validation "
            f"loss {probed.val_loss:.4f} with every expert on) on the validation batches it was evaluated on.</p>"
            f"{chart(figures[f'{name}-importance'][0], f'chart-importance-{name}')}"
            f"{importance_table(name, probed.importance)}"
        )
    similarity = probed.similarity if probed is not None else None
    if num_experts < 2 or (together is None and not similarity):
        return "\n".join(parts)
    parts.append(f"<h3>Which experts work together, which are redundant</h3><p>{READING}</p>")
    for key, title in (("together", "Picked together"), ("alike", "Alike")):
        if f"{name}-{key}" in figures:
            parts.append(f"<h4>{title}</h4>{chart(figures[f'{name}-{key}'][0], f'chart-{key}-{name}')}")
    parts.append(summary_table(name, probed.importance if probed else None, together, similarity))
    return "\n".join(parts)


def strongest_pair(matrix: list[list[float]], symmetric: bool) -> tuple[int, int, float]:
    """The off-diagonal cell with the highest value, the first on a tie (a symmetric map: above the diagonal)."""
    cells = [(i, j) for i in range(len(matrix)) for j in range(len(matrix)) if i != j and (j > i or not symmetric)]
    i, j = max(cells, key=lambda cell: matrix[cell[0]][cell[1]])
    return i, j, matrix[i][j]


def summary_table(name: str, importance, together, similarity) -> str:
    """Per layer, in words: the expert that costs most when off, the most alike pair, the closest partners."""
    layers = len(importance or together or similarity)
    rows = []
    for layer in range(layers):
        cells = []
        if importance:
            e = max(range(len(importance[layer])), key=importance[layer].__getitem__)
            cells.append(f"e{e} ({importance[layer][e]:+.3f})")
        if similarity:
            i, j, value = strongest_pair(similarity[layer], symmetric=True)
            cells.append(f"e{i} and e{j} (cosine {value:.2f})")
        if together:
            i, j, value = strongest_pair(together[layer], symmetric=False)
            cells.append(f"e{i} with e{j} ({value:.0%} of e{i}'s tokens)")
        rows.append(f"<tr><th>layer {layer + 1}</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = [
        title
        for title, present in (
            ("costs most when off", importance),
            ("most alike", similarity),
            ("most often together", together),
        )
        if present
    ]
    head_row = "<tr><th></th>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
    return f"<table class='pairs' id='pairs-{html.escape(name)}'>{head_row}{''.join(rows)}</table>"


def importance_table(name: str, importance: list[list[float]]) -> str:
    experts = len(importance[0])
    head = "<tr><th></th>" + "".join(f"<th>e{e}</th>" for e in range(experts)) + "</tr>"
    rows = "".join(
        f"<tr><th>layer {layer + 1}</th>" + "".join(f"<td>{v:+.3f}</td>" for v in row) + "</tr>"
        for layer, row in enumerate(importance)
    )
    return f"<table class='importance' id='importance-{html.escape(name)}'>{head}{rows}</table>"
