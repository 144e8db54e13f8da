"""Which characters each expert takes: a router planted by hand to send the vowels to expert 0 must
show exactly the vowels at the top of expert 0's list, in the event, the experts screen and
`moe-tui runs show --experts`."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import shutil
import subprocess

import pytest
import torch

from moe_core.events import ExpertChars, from_record, to_record
from moe_core.routing import mutual_information, routing_change, top_characters
from tests.conftest import cli
from tests.test_training import make_trainer
from tui.dashboard.app import Dashboard

VOWELS = set("aeiou")
needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="moe-tui report needs matplotlib: pip install -e '.[dev,report]'",
)
PLANTED_DIM = 0  # the embedding dimension that marks a vowel


def plant_vowels_on_expert_0(trainer) -> None:
    """Layer 0's router sends every vowel to expert 0 and nothing else there: the vowels' embeddings
    get a large +value in one dimension, every other character a large -value, and expert 0's gate
    reads that dimension alone."""
    model, vocab = trainer.model, trainer.vocab
    with torch.no_grad():
        for i, char in enumerate(vocab.chars):
            model.tok_emb.weight[i, PLANTED_DIM] = 20.0 if char in VOWELS else -20.0
        gate = model.moe_layers()[0].router.gate.weight
        gate[0].zero_()
        gate[0, PLANTED_DIM] = 10.0


@needs_matplotlib
def test_a_planted_router_shows_its_characters_everywhere(env, shared_dir, tmp_path, capsys):
    trainer = make_trainer(env, shared_dir, name="planted", pos_encoding="rope", eval_iters=4)
    plant_vowels_on_expert_0(trainer)
    result, routes = trainer.evaluate()
    assert isinstance(routes, ExpertChars) and routes.step == result.step == 0
    counts = torch.tensor(routes.counts[0])
    assert counts[:, 0].sum() > 0
    top = {char for char, _ in top_characters(counts, routes.chars, 0, n=10)}
    assert top == VOWELS  # all of them, and nothing else, went to expert 0
    for i, char in enumerate(routes.chars):  # every vowel routing went there, and no other character's
        assert (counts[i, 0] == counts[i].sum() / 2) if char in VOWELS else counts[i, 0] == 0
    assert from_record(to_record(routes)) == routes  # it round-trips through metrics.jsonl
    assert mutual_information(counts) > 0.1 and routing_change(counts, counts) == 0.0

    async def scenario():
        app = Dashboard(replay=[result, routes])
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("r")
            await pilot.pause(0.2)
            lines = str(app.screen.query_one("#experts-body").render()).splitlines()
            expert_0 = next(line for line in lines if line.startswith("e0 "))
            assert set(expert_0.split()[2:]) and {item[0] for item in expert_0.split()[2:]} == VOWELS

    asyncio.run(scenario())

    trainer.emit(result)  # logged, as an evaluation in training would: the report reads them
    trainer.emit(routes)
    code, out, err = cli(capsys, "report", "planted")
    assert code == 0, err
    page = (env / "planted" / "report.html").read_text()
    row = page.split("id='experts-layer-1'>")[1].split("</tr>")[0]
    assert row.startswith("<tr><td>e0</td>") and {item[0] for item in row.split("<td>")[2].split()[::2]} == VOWELS

    trainer.best_val = result.val_loss
    trainer.save(best=True)  # `runs show --experts` reads the best checkpoint
    code, out, err = cli(capsys, "runs", "show", "planted", "--experts")
    assert code == 0, err
    layer_0 = out.split("layer 2/")[0]
    expert_0 = next(line for line in layer_0.splitlines() if line.startswith("e0 "))
    assert {item[0] for item in expert_0.split()[3:]} == VOWELS  # after its share and its importance
    assert f"step {routes.step}" in out


def test_each_evaluation_logs_the_routes_beside_its_losses(env, shared_dir):
    trainer = make_trainer(env, shared_dir, name="logged", max_iters=20, eval_interval=10, sample_tokens=0)
    trainer.run()
    records = trainer.run_folder.read_metrics()
    evals = [r["step"] for r in records if r["event"] == "EvalMetrics"]
    routes = [r for r in records if r["event"] == "ExpertChars"]
    assert [r["step"] for r in routes] == evals == [10, 20]
    shape = (trainer.config.n_layer, len(trainer.vocab), trainer.config.num_experts)
    assert torch.tensor(routes[0]["counts"]).shape == shape
    # every validation token's top-k choices, counted once per layer
    tokens = trainer.config.eval_iters * trainer.config.batch_size * trainer.config.block_size
    assert torch.tensor(routes[0]["counts"]).sum(dim=(1, 2)).tolist() == [tokens * trainer.config.top_k] * shape[0]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@needs_matplotlib
def test_the_report_has_every_chart_and_a_table_per_layer_and_overlays_runs(env, two_trained, capsys):
    code, out, err = cli(capsys, "report", "tiny", "slower", "--out", str(env / "both.html"))
    assert code == 0, err
    page = (env / "both.html").read_text()
    for chart in (
        "chart-loss-linear",
        "chart-loss-log",
        "chart-schedule",
        "chart-load-tiny",
        "chart-experts-tiny",
        "chart-load-slower",
        "chart-experts-slower",
    ):
        assert f"id='{chart}'><svg" in page, chart
    assert page.count("id='experts-layer-") == 2 * 2  # two layers, two runs
    assert "tiny val" in page and "slower val" in page  # the overlay's legend names both runs
    assert "<script" not in page and not re.search(r"""(src|href)=["'](https?:|//)""", page)  # nothing fetched
    code, out, err = cli(capsys, "report", "tiny", "--format", "png", "--out", str(env / "pictures"))
    assert code == 0, err
    assert {p.name for p in (env / "pictures").iterdir()} >= {"loss-linear.png", "schedule.png", "tiny-experts.png"}


@needs_matplotlib
def test_a_run_recorded_before_expert_counts_says_they_are_absent(trained, capsys):
    run = trained
    metrics = run / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines() if '"ExpertChars"' not in line))
    code, out, err = cli(capsys, "report", "tiny")
    assert code == 0, err
    page = (run / "report.html").read_text()
    assert "id='no-expert-chars'" in page and "chart-loss-linear" in page


@needs_matplotlib
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (.ci/run installs it)")
def test_the_report_opens_in_a_real_headless_browser(trained, capsys, tmp_path):
    assert cli(capsys, "report", "tiny")[0] == 0
    url = (trained / "report.html").as_uri()
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<svg") >= 5 and "experts-layer-2" in dom.stdout  # the browser parsed the charts
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [*browser, "--window-size=1200,2400", f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and shot.stat().st_size > 50_000, done.stderr[-2000:]  # a page with pictures


def test_counting_leaves_no_hook_behind(env, shared_dir):
    trainer = make_trainer(env, shared_dir, name="hooks", eval_iters=1)
    trainer.evaluate()
    assert all(not layer.router._forward_hooks for layer in trainer.model.moe_layers())  # training pays nothing
