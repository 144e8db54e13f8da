"""Helpers for the tests that run real process groups (tests/test_distributed.py, tests/test_rank_faults.py):
torchrun's launcher (`--nproc`, and torchrun itself), gloo over loopback on the CPU, tiny models."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file

from tests.conftest import REPO, TINY, as_flags, moe_tui_here, shared_data_dir

# Batch 32 (16 a rank): the tolerances of test_distributed.py were measured with it.
DP = {**TINY, "batch_size": 32, "warmup_iters": 400, "eval_interval": 20, "ckpt_interval": 20, "max_iters": 40}
DP_FLAGS = as_flags(DP)


def environment(runs: Path) -> dict:
    # One torch thread per rank: two ranks of two threads on two cores run ~50x slower (libgomp spins).
    return {
        **os.environ,
        "MOE_TUI_DATA": str(shared_data_dir()),
        "MOE_TUI_RUNS": str(runs),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }


def start(
    args: list[str], runs: Path, module: str = "tui", launcher: list[str] = (), env: dict | None = None
) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *launcher, *(["-m"] if launcher else []), module, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**environment(runs), **(env or {})},
        cwd=REPO,
        start_new_session=True,
    )


def train(args: list[str], runs: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    process = start(["train", "simpsons", *args, "--headless"], runs, env=env)
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def stdout_of_training(args: list[str], runs: Path) -> str:
    """What `train simpsons ARGS --headless` printed, run to a successful end: as real processes with
    `--nproc`; without it, in this process on one torch thread as the straight runs (its being a process
    of its own is not what the tests that call this check)."""
    if not any(arg.startswith("--nproc") for arg in args):
        return moe_tui_here(runs, "trained-here", "train", "simpsons", *args, "--headless", threads=1)
    done = train(args, runs)
    assert done.returncode == 0, done.stderr
    return done.stdout


def records(run: Path, event: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def evals(run: Path) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["train_loss"], r["val_loss"]) for r in records(run, "EvalMetrics")}


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors")


class Trained(NamedTuple):
    run: Path
    done: subprocess.CompletedProcess


def cut_copy(run: Path, to: Path, step: int) -> Path:
    """A copy of `run` as a run stopped after its checkpoint of `step`: the later step checkpoints gone
    (what a crash after them leaves is tested in test_faults.py; a resume starts from the newest left)."""
    shutil.copytree(run, to)
    for folder in (to / "checkpoints").glob("step-*"):
        if int(folder.name[5:]) > step:
            shutil.rmtree(folder)
    return to


def wait_for_line(process: subprocess.Popen, pattern: str, timeout: float = 120) -> list[str]:
    """Read stdout until a line matches; returns the lines read."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return seen
    process.kill()
    raise AssertionError(f"{pattern!r} never printed: {''.join(seen)}\n{process.stderr.read()}")


def rank_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of the processes torchrun started under `launcher`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(v.split("=", 1) for v in (entry / "environ").read_text().split("\0") if "=" in v)
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher and "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def processes_of(runs: Path) -> list[int]:
    """PIDs of the processes whose environment points at this runs folder: a test's launchers and ranks."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"MOE_TUI_RUNS={runs}\0".encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_machines(args: list[str], runs: Path, cwds: tuple[Path, Path]) -> list[subprocess.Popen]:
    """docs/parallel.md's multi-node command, both "machines" on this one: a torchrun per node, one process each."""
    port = free_port()
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node_rank",
                str(node),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "-m",
                "tui",
                "train",
                *args,
                "--headless",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment(runs),
            cwd=cwd,
            start_new_session=True,
        )
        for node, cwd in enumerate(cwds)
    ]


def finish(processes: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    try:
        return [p.communicate(timeout=timeout) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
