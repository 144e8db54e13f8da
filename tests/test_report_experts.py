"""The report's expert sections: each expert's importance, which experts are picked together and how alike
they are, measured on the best checkpoint with the numbers a direct probe gives; each expert's share and
the routing's drift over the run; and colour bars that sit beside the maps, never over them."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pytest

from moe_core.events import ExpertChars
from moe_core.probe.request import ProbeRequest
from moe_core.probe.source import SavedModel
from moe_core.routing import co_activation, expert_shares, routing_change
from moe_core.store.runs import Run
from tests.conftest import shared_data_dir, train_here
from tests.test_routes import needs_matplotlib
from tui.cli import main

pytestmark = needs_matplotlib


def report(runs: Path, name: str) -> str:
    """`moe-tui report NAME`, in this process; the page it wrote."""
    code = main(["report", name, "--runs-dir", str(runs), "--data-dir", str(shared_data_dir())])
    assert code == 0
    return (runs / name / "report.html").read_text(encoding="utf-8")


def probed(runs: Path, name: str):
    """What the engine says of the run's best checkpoint, asked directly."""
    saved = SavedModel.load(Run.open(runs, name), "best", shared_data_dir())
    return saved, saved.probe(ProbeRequest(experts=True))


def table(page: str, id: str) -> list[list[str]]:
    """The cells of an HTML table of the page, row by row, header row and header cells left out."""
    body = page.split(f"id='{id}'>")[1].split("</table>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", body)[1:]
    return [[html.unescape(cell) for cell in re.findall(r"<td>(.*?)</td>", row)] for row in rows]


def strongest(matrix: list[list[float]]) -> tuple[int, int]:
    """The off-diagonal cell with the highest value."""
    return max(
        ((i, j) for i in range(len(matrix)) for j in range(len(matrix)) if i != j), key=lambda c: matrix[c[0]][c[1]]
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, trained_once) -> Path:
    """A runs folder holding a copy of the session's tiny run (3 evaluations, a best checkpoint)."""
    folder = tmp_path_factory.mktemp("report-experts")
    shutil.copytree(trained_once, folder / "tiny")
    return folder


@pytest.fixture(scope="module")
def page(runs) -> str:
    return report(runs, "tiny")


@pytest.fixture(scope="module")
def direct(runs):
    """The engine's own answer for the tiny run's best checkpoint."""
    return probed(runs, "tiny")[1]


def test_the_importance_table_shows_the_numbers_a_direct_probe_gives(page, direct):
    assert direct.importance is not None and any(abs(v) > 1e-4 for row in direct.importance for v in row)
    assert table(page, "importance-tiny") == [[f"{v:+.3f}" for v in row] for row in direct.importance]
    assert f"validation loss {direct.val_loss:.4f} with every expert on" in page
    assert "id='chart-importance-tiny'><svg" in page
    costliest = [cells[0] for cells in table(page, "pairs-tiny")]
    for layer, row in enumerate(direct.importance):
        e = row.index(max(row))
        assert costliest[layer] == f"e{e} ({row[e]:+.3f})"


def test_the_pairs_sections_name_the_most_alike_and_the_closest_partners(runs, page, direct):
    last = [e for e in Run.open(runs, "tiny").events() if isinstance(e, ExpertChars)][-1]
    assert last.pairs is not None
    assert "id='chart-together-tiny'><svg" in page and "id='chart-alike-tiny'><svg" in page
    assert "Which experts work together, which are redundant" in page
    rows = table(page, "pairs-tiny")
    assert len(rows) == len(direct.similarity) == len(last.pairs) == 2
    for layer, (_, alike, together) in enumerate(rows):
        i, j = sorted(strongest(direct.similarity[layer]))
        assert alike == f"e{i} and e{j} (cosine {direct.similarity[layer][i][j]:.2f})"
        shares = co_activation(last.pairs[layer])
        i, j = strongest(shares)
        assert together == f"e{i} with e{j} ({shares[i][j]:.0%} of e{i}'s tokens)"


def test_a_run_recorded_before_pairs_were_counted_gets_them_from_its_checkpoint(runs, page):
    shutil.copytree(runs / "tiny", runs / "nopairs")
    metrics = runs / "nopairs" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    for record in records:
        record.pop("pairs", None)
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert all(e.pairs is None for e in Run.open(runs, "nopairs").events() if isinstance(e, ExpertChars))

    old_page = report(runs, "nopairs")
    saved, _ = probed(runs, "nopairs")
    counted = saved.routes()
    assert "id='chart-together-nopairs'><svg" in old_page
    for layer, cells in enumerate(table(old_page, "pairs-nopairs")):
        shares = co_activation(counted.pairs[layer])
        i, j = strongest(shares)
        assert cells[-1] == f"e{i} with e{j} ({shares[i][j]:.0%} of e{i}'s tokens)"


def test_the_share_and_drift_figures_draw_every_evaluation(runs, page):
    from tui.report_experts import drift_figure, shares_figure

    assert "id='chart-load-tiny'><svg" in page and "id='chart-drift-tiny'><svg" in page
    events = Run.open(runs, "tiny").events()
    routes = [e for e in events if isinstance(e, ExpertChars)]
    assert len(routes) == 3  # evaluations at steps 10, 20, 30
    figure = shares_figure([], routes)
    for layer, axis in enumerate(figure.axes[:2]):
        dots = [line for line in axis.lines if line.get_marker() == "o"]
        for e, line in enumerate(dots):
            assert list(line.get_xdata()) == [r.step for r in routes]
            assert list(line.get_ydata()) == [expert_shares(r.counts[layer])[e] for r in routes]
    lines = drift_figure(routes).axes[0].lines
    assert len(lines) == 2  # a line per layer
    for layer, line in enumerate(lines):
        moved = [routing_change(a.counts[layer], b.counts[layer]) for a, b in zip(routes, routes[1:])]
        assert list(line.get_ydata()) == moved and max(moved) > 0


def test_no_colour_bar_covers_a_map(runs):
    """The lift colour bar was drawn over the layer heat maps (seen in Chromium at 1200 px): every
    colour bar of every report figure now has a place of its own."""
    import matplotlib.pyplot as plt

    from tui.commands.report import RunEvents, build_figures
    from tui.report_experts import measure

    recorded = RunEvents(Run.open(runs, "tiny"))
    figures = build_figures([recorded], {"tiny": measure(recorded.run, shared_data_dir(), False)})
    checked = 0
    for name, (figure, _) in figures.items():
        figure.canvas.draw()  # constrained layout places the axes at drawing time
        bars = [axis for axis in figure.axes if axis.get_label() == "<colorbar>"]
        for bar in bars:
            for axis in figure.axes:
                if axis not in bars:
                    assert not bar.get_window_extent().overlaps(axis.get_window_extent()), name
                    checked += 1
        plt.close(figure)
    assert checked >= 2 + 1 + 2 + 2  # lift: two layers; importance: one map; picked together, alike: two each


def test_a_model_whose_experts_cannot_be_switched_off_one_at_a_time_says_so(tmp_path):
    train_here(tmp_path, "all", "--num-experts", "2", "--top-k", "2")
    page = report(tmp_path, "all")
    assert "id='no-importance-all'" in page and "each token goes to 2 of the 2 experts" in page
    assert "id='importance-all'" not in page
    assert "id='chart-alike-all'><svg" in page  # similarity needs no switching off


def test_svg_files_hold_the_expert_figures_too(runs, tmp_path):
    code = main(
        [
            "report",
            "tiny",
            "--format",
            "svg",
            "--out",
            str(tmp_path),
            "--runs-dir",
            str(runs),
            "--data-dir",
            str(shared_data_dir()),
        ]
    )
    assert code == 0
    written = {p.name for p in tmp_path.iterdir()}
    for figure in ("load", "drift", "experts", "importance", "together", "alike"):
        assert f"tiny-{figure}.svg" in written, figure
        assert (tmp_path / f"tiny-{figure}.svg").read_text().lstrip().startswith("<?xml")
