"""`moe-tui train --fork RUN[@STEP|@best]`: a new run from another's checkpoint. With no setting
changed it continues exactly as its parent did; its origin shows in `runs`, `runs show` and config.toml."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_core.live.follow import RunFollower
from moe_core.store.checkpoint import MODEL_FILE
from moe_core.store.runs import Run
from tests.conftest import TINY, as_flags, cli, train_here
from tui.dashboard.app import Dashboard
from tui.dashboard.widgets.loss_chart import LossChart

# Dropout and router noise on: the fork must take its parent's random streams, not only its weights.
PARENT = {**TINY, "router": "noisy_topk", "dropout": 0.1, "max_iters": 60, "eval_interval": 20,
          "ckpt_interval": 20, "sample_tokens": 0}  # fmt: skip


@pytest.fixture(scope="module")
def parent_once(tmp_path_factory) -> Path:
    """The parent, trained once for the tests here, which each fork a copy of it."""
    return train_here(tmp_path_factory.mktemp("parent"), "parent", *as_flags(PARENT))


@pytest.fixture
def parent(env, parent_once, capsys) -> Path:
    capsys.readouterr()
    return shutil.copytree(parent_once, env / "parent")


def weights(run, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:08d}" / MODEL_FILE)


def test_a_fork_with_nothing_changed_continues_as_its_parent_did(env, parent, capsys, monkeypatch):
    code, out, err = cli(capsys, "train", "--fork", "parent@20", "--headless")
    assert code == 0, err
    fork = env / "parent-fork20"
    assert "resuming at step 20" in out
    ours, theirs = weights(fork, 60), weights(env / "parent", 60)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    started = [json.loads(line) for line in (fork / "metrics.jsonl").read_text().splitlines()][0]
    assert started["event"] == "RunStarted" and started["start_step"] == 20  # its curve starts where it forked
    assert json.loads((fork / "fork.json").read_text()) == {
        "parent": "parent", "step": 20, "checkpoint": "step-00000020", "changed": {}}  # fmt: skip

    code, out, err = cli(capsys, "train", "--fork", "parent@40", "--lr", "0.001", "--run-name", "slower", "--headless")
    assert code == 0, err
    assert not torch.equal(weights(env / "slower", 60)["tok_emb.weight"], theirs["tok_emb.weight"])
    assert "# forked from run parent at step 40" in (env / "slower" / "config.toml").read_text()
    code, out, _ = cli(capsys, "runs", "show", "slower")
    assert "forked from parent at step 40 (lr 0.003 -> 0.001)" in out
    monkeypatch.setenv("COLUMNS", "200")  # the whole table, whatever this terminal's width
    code, out, _ = cli(capsys, "runs")
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines() if "│" in line}
    assert rows["slower"] == "parent@40" and rows["parent-fork20"] == "parent@20" and rows["parent"] == "-"


def test_a_fork_takes_its_parents_settings_as_they_were_at_its_step(env, capsys, trained_once):
    """A setting changed live after the fork's step is the parent's later history, not the fork's."""
    shutil.copytree(trained_once, env / "tiny")
    config = env / "tiny" / "config.toml"
    config.write_text(config.read_text().replace("lr = 0.003", "lr = 0.002"))
    change = {"event": "SettingsChanged", "step": 25, "key": "lr", "old": 0.003, "new": 0.002, "source": "moe-tui set"}
    with open(env / "tiny" / "metrics.jsonl", "a") as log:
        log.write(json.dumps(change) + "\n")
    code, out, err = cli(capsys, "train", "--fork", "tiny@20", "--max-iters", "25", "--headless")
    assert code == 0, err
    assert "lr = 0.003" in (env / "tiny-fork20" / "config.toml").read_text()


def test_watch_overlays_a_parent_and_its_fork_each_from_where_it_began(env, parent, capsys):
    code, _, err = cli(capsys, "train", "--fork", "parent@20", "--lr", "0.001", "--run-name", "kid", "--headless")
    assert code == 0, err

    async def scenario():
        app = Dashboard(sources=[RunFollower(Run(env / name)) for name in ("parent", "kid")])
        async with app.run_test(size=(120, 40)) as pilot:
            while not all(view.state == "finished" for view in app.views):
                await pilot.pause(0.05)
            chart = app.screen.query_one(LossChart)
            return [view.eval_val.points(None)[0] for view in app.views], [name for name, _ in chart.overlay]

    (parent_steps, kid_steps), overlaid = asyncio.run(scenario())
    assert overlaid == ["parent", "kid"]
    assert parent_steps == [20, 40, 60] and kid_steps == [40, 60]  # the fork's curve starts after step 20
