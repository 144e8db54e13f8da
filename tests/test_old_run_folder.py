"""A run folder written before the restructuring (commit 0f309f0, see tests/fixtures/old_run/README.md)
still works with the code of today: it resumes, it is listed and shown, it is reported on and watched.

The fixture is never touched: each test works on its own copy in the test's runs folder.
"""

from __future__ import annotations

import asyncio
import html
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from moe_core.live.lease import read_status
from moe_core.model.sampling import SampleRequest
from moe_core.store.runs import Run
from tests.conftest import cli
from tests.test_dashboard import SIZE, status_text, wait_until

FIXTURE = Path(__file__).parent / "fixtures" / "old_run" / "old"
NAME, LAST_STEP = "old", 20  # facts of the fixture


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def recorded(kind: str) -> list[dict]:
    """The fixture's own records of one kind, as the old code wrote them."""
    return [r for r in records(FIXTURE / "metrics.jsonl") if r.get("event") == kind]


def words(text: str) -> str:
    """Rich wraps to the console's width: compare text with its whitespace folded."""
    return " ".join(text.split())


@pytest.fixture
def old(env, capsys) -> Run:
    """A private copy of the old run folder, named 'old', in this test's runs folder."""
    capsys.readouterr()
    shutil.copytree(FIXTURE, env / NAME)
    return Run(env / NAME)


def test_the_fixture_is_what_the_old_code_wrote():
    # What the other tests take for granted; if this fails, the fixture was changed, not the code.
    assert (FIXTURE / "config.toml").is_file() and (FIXTURE / "vocab.json").is_file()
    assert json.loads((FIXTURE / "process.json").read_text())["state"] == "finished"
    assert max(r["step"] for r in recorded("StepMetrics")) == LAST_STEP
    assert sorted(p.name for p in (FIXTURE / "checkpoints").iterdir()) == ["best", f"step-{LAST_STEP:08d}"]
    assert not list(FIXTURE.rglob("lock")) and not list(FIXTURE.rglob("*.sock"))


def test_an_old_run_resumes_from_its_last_checkpoint(old, capsys):
    before = records(old.metrics_path)
    code, out, err = cli(capsys, "train", "--resume", NAME, "--max-iters", "30", "--headless")
    assert code == 0, err
    assert f"resuming at step {LAST_STEP}" in out
    assert old.checkpoint("latest").name == "step-00000030"
    assert "max_iters = 30" in old.config_path.read_text(encoding="utf-8")

    after = records(old.metrics_path)
    assert after[: len(before)] == before  # the old history kept as it was
    added = after[len(before) :]
    started = [r for r in added if r["event"] == "RunStarted"]
    assert len(started) == 1 and started[0]["resumed"] and started[0]["start_step"] == LAST_STEP
    new_steps = [r["step"] for r in added if r["event"] == "StepMetrics"]
    assert new_steps and min(new_steps) > LAST_STEP and new_steps[-1] == 30
    assert [r["step"] for r in added if r["event"] == "EvalMetrics"] == [30]
    assert any(r["event"] == "CheckpointSaved" and r["step"] == 30 for r in added)
    status = read_status(old)
    assert status.state == "finished" and status.step == 30


def test_runs_and_runs_show_read_an_old_run(old, capsys):
    manifest = json.loads((old.checkpoints / "best" / "manifest.json").read_text(encoding="utf-8"))
    best = manifest["val_loss"]
    assert manifest["step"] == LAST_STEP

    code, out, err = cli(capsys, "runs", "show", NAME)
    assert code == 0, err
    shown = words(out)
    assert shown.startswith(f"{NAME} ") and "(finished)" in shown
    assert f"step {LAST_STEP}/{LAST_STEP}" in shown
    assert f"best val {round(best, 4)}" in shown
    assert f"checkpoints: step-{LAST_STEP:08d}, best" in shown
    assert (old.config_path.read_text(encoding="utf-8").splitlines()[0]) in out  # the config, as written

    code, out, err = cli(capsys, "runs")
    assert code == 0, err
    assert NAME in out and f"{LAST_STEP}/{LAST_STEP}" in out and f"{best:.4f}" in out


def test_report_draws_an_old_run(old, capsys):
    code, out, err = cli(capsys, "report", NAME)
    assert code == 0, err
    page = old.path / "report.html"
    assert f"wrote {page}" in words(out)
    text = page.read_text(encoding="utf-8")
    assert "<svg" in text  # the charts, drawn from the old events
    assert html.escape(NAME) in text
    last_sample = recorded("Sample")[-1]["text"].strip()
    assert html.escape(last_sample) in text or html.escape(last_sample, quote=False) in text


def test_watch_shows_an_old_finished_run_from_its_files(old, capsys, monkeypatch):
    """`moe-tui watch old`, the command itself, with its screen driven by Textual's Pilot instead of a
    terminal: everything up to the dashboard is the real command."""
    import tui.dashboard.runner as runner
    from tui.commands import live as live_commands

    evals = recorded("EvalMetrics")
    samples = [r["text"] for r in recorded("Sample")]
    max_iters = 20  # the fixture's config.toml
    seen: dict = {}

    def viewer_under_pilot(followers, runs_dir) -> int:
        app = runner.viewer_app(followers, runs_dir)

        async def scenario():
            async with app.run_test(size=SIZE) as pilot:
                await wait_until(pilot, lambda: app.view.state == "finished")
                seen.update(
                    step=app.view.step,
                    status=status_text(app),
                    live=followers[0].live,
                    evals=len(app.view.eval_val.points(None)[0]),
                    samples=[s.text for s in app.view.samples if not s.requested],
                )
                followers[0].sample(SampleRequest("Bart:", 20, temperature=0.0))  # from the old checkpoint, here
                await wait_until(pilot, lambda: any(s.requested for s in app.view.samples))
                seen["sampled"] = next(s for s in app.view.samples if s.requested).text
                await pilot.press("q")
            seen["return_code"] = app.return_code

        asyncio.run(scenario())
        return 0

    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(runner, "run_viewer", viewer_under_pilot)
    monkeypatch.setattr(live_commands, "sys", SimpleNamespace(stdout=Terminal(), stdin=Terminal(), stderr=sys.stderr))

    code, out, err = cli(capsys, "watch", NAME)
    assert code == 0, err
    assert seen["live"] is False  # no trainer: read from the files
    assert seen["step"] == LAST_STEP
    assert "FINISHED" in seen["status"] and f"step {LAST_STEP}/{max_iters}" in seen["status"]
    assert f"{NAME} · simpsons · cpu" in seen["status"]
    assert f"val {evals[-1]['val_loss']:.3f}" in seen["status"]
    assert seen["evals"] == len(evals)
    assert sorted(seen["samples"]) == sorted(samples)
    assert seen["sampled"].startswith("Bart:") and len(seen["sampled"]) == len("Bart:") + 20
    assert seen["return_code"] == 0
