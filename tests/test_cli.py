"""The `moe-tui` command line, end to end: train, resume, sample, runs, datasets, and every bad input."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_core.checkpoint import MODEL_FILE
from tui.cli import main

from .conftest import TINY_FLAGS, shared_data_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(tmp_path, shared_dir, monkeypatch):
    """Point the CLI at the offline corpora and a fresh runs folder."""
    monkeypatch.setenv("MOE_TUI_DATA", str(shared_dir))
    monkeypatch.setenv("MOE_TUI_RUNS", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "runs"


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def tree(path: Path) -> dict[str, tuple[int, float]]:
    """Every file under `path` with its size and mtime: to prove a failed command wrote nothing."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory) -> Path:
    """One finished tiny run (30 steps, checkpoints at 10, 20, 30), trained once for the module."""
    runs = tmp_path_factory.mktemp("trained")
    code = main(["train", "simpsons", *TINY_FLAGS, "--max-iters", "30", "--ckpt-interval", "10",
                 "--eval-interval", "10", "--run-name", "tiny", "--headless",
                 "--data-dir", str(shared_data_dir()), "--runs-dir", str(runs)])
    assert code == 0
    return runs / "tiny"


@pytest.fixture
def trained(env, trained_once, capsys) -> Path:
    """A private copy of the tiny run, named 'tiny', in this test's runs folder."""
    capsys.readouterr()
    shutil.copytree(trained_once, env / "tiny")
    return env / "tiny"


def test_headless_train_prints_progress_and_writes_the_run(trained, capsys):
    run = trained
    assert {p.name for p in run.iterdir()} >= {"config.toml", "vocab.json", "metrics.jsonl", "samples.txt",
                                               "checkpoints"}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "best", "step-00000010", "step-00000020", "step-00000030"]
    config = (run / "config.toml").read_text()
    assert "[model]" in config and "n_embd = 64" in config and 'dataset = "simpsons"' in config


def test_headless_output_lines(env, capsys):
    code, out, err = cli(capsys, "train", "simpsons", *TINY_FLAGS, "--max-iters", "20", "--eval-interval", "10",
                         "--run-name", "lines", "--headless")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("training run 'lines' on simpsons | device cpu |")
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 2 and "tok/s" in steps[0] and "lr " in steps[0] and "loss " in steps[0]
    assert "experts cv " in steps[0] and "drop 0.0%" in steps[0]  # the tiny config is dropless
    evals = [line for line in lines if line.startswith("eval ")]
    assert len(evals) == 2 and "val " in evals[0] and "bits/char" in evals[0]
    assert "moe-tui sample lines" in err


def test_resume_continues_from_the_latest_checkpoint(trained, capsys):
    code, out, err = cli(capsys, "train", "--resume", "tiny", "--max-iters", "40", "--headless")
    assert code == 0, err
    assert "resuming at step 30" in out
    assert "step     40" in out and "step     10" not in out
    assert "max_iters = 40" in (trained / "config.toml").read_text()  # the safe override is recorded


def test_sample_streams_text_that_starts_with_the_prompt(trained, capsys):
    code, out, err = cli(capsys, "sample", "tiny", "--prompt", "Moe:", "--max-new-tokens", "50", "--seed", "3")
    assert code == 0, err
    assert out.startswith("Moe:") and len(out.rstrip("\n")) >= 50
    again = cli(capsys, "sample", "tiny", "--prompt", "Moe:", "--max-new-tokens", "50", "--seed", "3")[1]
    assert again == out  # seeded: reproducible
    code, out, _ = cli(capsys, "sample", "tiny", "--prompt", "Moe:", "--num-samples", "3", "--max-new-tokens", "20",
                       "--checkpoint", "best", "--temperature", "0")
    assert code == 0 and out.count("--- sample") == 3


def test_runs_and_datasets_listings(trained, capsys):
    code, out, _ = cli(capsys, "runs")
    assert code == 0 and "tiny" in out and "simpsons" in out and "30/30" in out
    code, out, _ = cli(capsys, "runs", "show", "tiny")
    assert code == 0 and "step-00000030" in out and "n_layer = 2" in out
    code, out, _ = cli(capsys, "datasets")
    assert code == 0 and "shakespeare" in out and "simpsons" in out and "yes" in out


def write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


SHORT = ["--max-iters", "5", "--headless"]

# Each case: the arguments (with {tmp} for the test folder), and words the one-line error must contain.
BAD_INPUTS = {
    "unknown dataset": (["train", "nosuch", *SHORT], "not found"),
    "missing corpus file": (["train", "{tmp}/missing.txt", *SHORT], "not found"),
    "empty corpus": (["train", "{tmp}/empty.txt", *SHORT], "empty"),
    "too-short corpus": (["train", "{tmp}/short.txt", *SHORT], "too short"),
    "non-UTF-8 corpus": (["train", "{tmp}/latin1.txt", *SHORT], "--encoding"),
    "unknown CSV column": (["train", "{tmp}/lines.csv", "--column", "nope", *SHORT], "column"),
    "n_embd not divisible by n_head": (["train", "simpsons", "--n-embd", "100", "--n-head", "8", *SHORT],
                                       "divisible"),
    "top_k above num_experts": (["train", "simpsons", "--num-experts", "2", "--top-k", "3", *SHORT], "--top-k"),
    "zero layers": (["train", "simpsons", "--n-layer", "0", *SHORT], "--n-layer"),
    "negative batch size": (["train", "simpsons", "--batch-size", "-4", *SHORT], "--batch-size"),
    "negative capacity factor": (["train", "simpsons", "--capacity-factor", "-1", *SHORT], "--capacity-factor"),
    "zero learning rate": (["train", "simpsons", "--lr", "0", *SHORT], "--lr"),
    "negative learning rate": (["train", "simpsons", "--lr", "-0.1", *SHORT], "--lr"),
    "unknown router": (["train", "simpsons", "--router", "softmax", *SHORT], "router"),
    "unknown preset": (["train", "simpsons", "--preset", "huge", *SHORT], "preset"),
    "no CUDA": (["train", "simpsons", "--device", "cuda", *SHORT], "cuda"),
    "not an integer": (["train", "simpsons", "--n-layer", "two", *SHORT], "--n-layer"),
    "unknown flag": (["train", "simpsons", "--layers", "2", *SHORT], "--layers"),
    "run name with a slash": (["train", "simpsons", "--run-name", "a/b", *SHORT], "run name"),
    "run name with ..": (["train", "simpsons", "--run-name", "..", *SHORT], "run name"),
    "existing run name": (["train", "simpsons", "--run-name", "tiny", *SHORT], "--resume"),
    "resume unknown run": (["train", "--resume", "ghost", *SHORT], "no run 'ghost'"),
    "resume with another shape": (["train", "--resume", "tiny", "--n-layer", "3", *SHORT], "n_layer"),
    "resume with another dataset": (["train", "shakespeare", "--resume", "tiny", *SHORT], "dataset"),
    "config file missing": (["train", "simpsons", "--config", "{tmp}/none.toml", *SHORT], "not found"),
    "config file not TOML": (["train", "simpsons", "--config", "{tmp}/bad.toml", *SHORT], "TOML"),
    "config file unknown key": (["train", "simpsons", "--config", "{tmp}/unknown.toml", *SHORT], "n_layers"),
    "config file wrong type": (["train", "simpsons", "--config", "{tmp}/wrongtype.toml", *SHORT], "n_layer"),
    "sample unknown run": (["sample", "ghost"], "no run 'ghost'"),
    "sample prompt outside vocabulary": (["sample", "tiny", "--prompt", "Ω≈"], "'Ω'"),
    "sample empty prompt": (["sample", "tiny", "--prompt", ""], "prompt"),
    "sample negative temperature": (["sample", "tiny", "--temperature", "-1"], "--temperature"),
    "sample unknown checkpoint": (["sample", "tiny", "--checkpoint", "oldest"], "--checkpoint"),
    "sample corrupt checkpoint": (["sample", "tiny", "--checkpoint", "best"], "corrupt"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_exit_2(case, trained, tmp_path, capsys):
    write(tmp_path / "empty.txt", "")
    write(tmp_path / "short.txt", "Homer: Doh!\n")
    write(tmp_path / "latin1.txt", "Moe's caf\xe9 is closed.\n".encode("latin-1") * 100)
    write(tmp_path / "lines.csv", "speaker,line\nHomer,Doh\n")
    write(tmp_path / "bad.toml", "n_layer = = 2\n")
    write(tmp_path / "unknown.toml", "n_layers = 2\n")
    write(tmp_path / "wrongtype.toml", 'n_layer = "two"\n')
    if case == "sample corrupt checkpoint":
        model = trained / "checkpoints" / "best" / MODEL_FILE
        model.write_bytes(model.read_bytes()[:-10])
    before = tree(tmp_path)
    args, needle = BAD_INPUTS[case]
    code, out, err = cli(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2, (case, out, err)
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert needle in err, err
    assert "Traceback" not in err + out
    assert tree(tmp_path) == before, "a failed command changed files on disk"


def test_overwrite_replaces_an_existing_run(trained, capsys):
    code, _, err = cli(capsys, "train", "simpsons", *TINY_FLAGS, "--max-iters", "10", "--run-name", "tiny",
                       "--overwrite", "--headless")
    assert code == 0, err
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["best", "step-00000010"]


def test_csv_columns_train(env, tmp_path, capsys):
    rows = ["raw_character_text,spoken_words"] + [f"Homer Simpson,Line number {i} at Moe's." for i in range(300)]
    rows.insert(5, "Moe Szyslak,")  # an empty value: the row is skipped
    csv = write(tmp_path / "dialogue.csv", "\n".join(rows) + "\n")
    code, out, err = cli(capsys, "train", str(csv), "--column", "raw_character_text", "--column", "spoken_words",
                         *TINY_FLAGS, "--max-iters", "10", "--headless")
    assert code == 0, err
    assert "training run 'dialogue-" in out


def _start(args: list[str], runs: Path) -> subprocess.Popen:
    env = {**os.environ, "MOE_TUI_DATA": str(shared_data_dir()), "MOE_TUI_RUNS": str(runs),
           "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "tui", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)


def test_ctrl_c_saves_prints_the_resume_command_and_exits_130(tmp_path, shared_dir):
    runs = tmp_path / "runs"
    proc = _start(["train", "simpsons", *TINY_FLAGS, "--max-iters", "100000", "--run-name", "sig"], runs)
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # wait until it is really training
        if line.startswith("step ") or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "moe-tui train --resume sig" in err and "Traceback" not in err
    steps = sorted((runs / "sig" / "checkpoints").glob("step-*"))
    assert steps, "Ctrl-C must save a checkpoint"
    resumed = _start(["train", "--resume", "sig", "--max-iters", str(int(steps[-1].name[5:]) + 10)], runs)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"resuming at step {int(steps[-1].name[5:])}" in out
