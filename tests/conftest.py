"""Shared fixtures: the offline copies of the named corpora, and tiny real configs that train in seconds."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from moe_core.data.corpus import CORPORA, load_corpus
from tests.no_skips_in_ci import pytest_configure, pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401
from tui.cli import main

REPO = Path(__file__).resolve().parents[1]

# The trackers' own stores go to a temporary folder, never the user's: Trackio reads $TRACKIO_DIR once, when
# first imported, and W&B keeps settings and caches beside its runs' folders.
_TRACKER_HOME = Path(tempfile.mkdtemp(prefix="moe-tui-trackers-"))
atexit.register(shutil.rmtree, _TRACKER_HOME, True)
for _var, _sub in (
    ("TRACKIO_DIR", "trackio"),
    ("WANDB_CONFIG_DIR", "wandb-config"),
    ("WANDB_CACHE_DIR", "wandb-cache"),
    ("WANDB_DATA_DIR", "wandb-data"),
):
    os.environ[_var] = str(_TRACKER_HOME / _sub)
os.environ.pop("MLFLOW_TRACKING_URI", None)

# Tests run many small models one after another. Alone, two intra-op threads on two cores is the sweet
# spot. Under pytest-xdist the workers share the cores: one thread each, and for the processes their tests
# start too (idle OpenMP threads spin, so two threads per worker run several times slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


def shared_data_dir() -> Path:
    """$MOE_TUI_DATA (CI points it at the offline copies), else the project's own data/ cache."""
    path = Path(os.environ.get("MOE_TUI_DATA") or REPO / "data")
    return path if path.is_absolute() else REPO / path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """A folder holding both named corpora, checked by sha256; downloaded once if it lacks them."""
    path = shared_data_dir()
    for name in CORPORA:
        load_corpus(name, path)  # no network when the file is there with the right hash
    return path


# A model small enough to train a few hundred steps in seconds on 2 CPU cores, but a real sparse MoE.
TINY = dict(
    n_layer=2,
    n_head=4,
    n_embd=64,
    block_size=32,
    num_experts=4,
    top_k=2,
    batch_size=16,
    lr=3e-3,
    warmup_iters=20,
    eval_interval=50,
    eval_iters=5,
    log_interval=10,
    sample_interval=100,
    sample_tokens=40,
    ckpt_interval=50,
    device="cpu",
)


def as_flags(settings: dict) -> list[str]:
    return [arg for key, value in settings.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


TINY_FLAGS = as_flags(TINY)

# Nothing scheduled, so that every checkpoint on disk is one the test asked for; a log line every 5 steps.
QUIET = dict(max_iters=100_000, eval_interval=100_000, sample_interval=100_000, ckpt_interval=100_000, log_interval=5)
QUIET_FLAGS = as_flags(QUIET)


def start_moe_tui(
    args: list[str], runs: Path, stdout=subprocess.PIPE, env: dict | None = None, **popen
) -> subprocess.Popen:
    """`moe-tui ARGS` as a real process of its own, with the offline corpora and `runs` as its runs folder;
    `env` adds to its environment."""
    return subprocess.Popen(
        [sys.executable, "-m", "tui", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "MOE_TUI_DATA": str(shared_data_dir()),
            "MOE_TUI_RUNS": str(runs),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        },
        cwd=REPO,
        **popen,
    )


def moe_tui(runs: Path, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`moe-tui ARGS` run to its end as a process of its own (`start_moe_tui`)."""
    process = start_moe_tui(list(args), runs, env=env)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


# -- the command line, in process ------------------------------------------------------------


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
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def train_here(runs: Path, name: str, *extra: str) -> Path:
    """`moe-tui train simpsons` of a finished tiny run (30 steps, checkpoints and evaluations at 10, 20, 30),
    in this process (`moe_tui_here`)."""
    every_10 = ["--max-iters", "30", "--ckpt-interval", "10", "--eval-interval", "10"]
    moe_tui_here(runs, name, "train", "simpsons", *TINY_FLAGS, *every_10, "--run-name", name, "--headless", *extra)
    return runs / name


# One torch thread for a process whose weights a test compares bit for bit with a run on one thread
# (`moe_tui_here(..., threads=1)`): the order of the sums depends on the thread count. MKL reads its
# own variable before OpenMP's.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def moe_tui_here(runs: Path, name: str, *args: str, threads: int | None = None) -> str:
    """`moe-tui ARGS` (a command that trains) run to its end in this process, on `threads` torch threads if
    given: no process start, no torch import. It must succeed. What it printed is kept in runs/NAME.stdout
    and NAME.stderr; its stdout is returned. The thread count and torch's random state are put back
    afterwards."""
    runs.mkdir(parents=True, exist_ok=True)
    before, random_state = torch.get_num_threads(), torch.get_rng_state()
    with (
        open(runs / f"{name}.stdout", "w") as out,
        open(runs / f"{name}.stderr", "w") as err,
        redirect_stdout(out),
        redirect_stderr(err),
    ):
        torch.set_num_threads(threads or before)
        try:
            code = main([*args, "--data-dir", str(shared_data_dir()), "--runs-dir", str(runs)])
        finally:
            torch.set_num_threads(before)
            torch.set_rng_state(random_state)
    assert code == 0, (runs / f"{name}.stderr").read_text()
    return (runs / f"{name}.stdout").read_text()


@pytest.fixture(scope="session")
def trained_once(tmp_path_factory) -> Path:
    """One finished tiny run, 'tiny', trained once per session (`train_here`): tests copy it."""
    return train_here(tmp_path_factory.mktemp("trained"), "tiny")


@pytest.fixture(scope="session")
def slower_once(tmp_path_factory) -> Path:
    """Another, 'slower': the same but for a third of the learning rate, so that its curves differ."""
    return train_here(tmp_path_factory.mktemp("slower"), "slower", "--lr", "1e-3")


@pytest.fixture
def trained(env, trained_once, capsys) -> Path:
    """A private copy of the tiny run, named 'tiny', in this test's runs folder."""
    capsys.readouterr()
    shutil.copytree(trained_once, env / "tiny")
    return env / "tiny"


@pytest.fixture
def two_trained(trained, slower_once) -> tuple[Path, Path]:
    """Private copies of two finished runs that differ, 'tiny' and 'slower', in this test's runs folder."""
    shutil.copytree(slower_once, trained.parent / "slower")
    return trained, trained.parent / "slower"
