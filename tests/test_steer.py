"""Steering a run while it trains: `moe-tui set` changes its settings between two steps, on real
processes; a run killed with SIGKILL after a change resumes to the very weights of a run that never
stopped; the dashboard's `o` key does the same from the screen."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

from moe_core.live.client import live_client
from moe_core.live.lease import read_status
from moe_core.store.checkpoint import MODEL_FILE
from moe_core.store.runs import Run
from tests.conftest import ONE_THREAD, TINY, as_flags, moe_tui, moe_tui_here, start_moe_tui
from tests.ranks import DP_FLAGS
from tests.test_faults import records, wait_until

# Dropout and router noise on: a change must land on the random streams exactly as it did first.
STEER = {
    **TINY,
    "batch_size": 32,  # steps slow enough that `set` and the kill land before the checkpoint at 100
    "router": "noisy_topk",
    "dropout": 0.05,
    "lr_schedule": "constant",
    "max_iters": 150,
    "eval_interval": 50,
    "ckpt_interval": 50,
    "sample_tokens": 0,
}
CHANGE = ["lr=0.001", "aux_loss_coef=0.05", "dropout=0.2"]


def steps_logged(run: Path) -> int:
    return max((r["step"] for r in records(run, "StepMetrics")), default=0)


def test_set_then_sigkill_then_resume_ends_as_the_run_that_never_stopped(tmp_path):
    runs = tmp_path / "runs"
    killed = runs / "killed"
    started = moe_tui(runs, "train", "simpsons", *as_flags(STEER), "--run-name", "killed", "--detach", env=ONE_THREAD)
    assert started.returncode == 0, started.stderr
    wait_until(lambda: steps_logged(killed) >= 60, 120, "training past its first checkpoint")

    done = moe_tui(runs, "set", "killed", *CHANGE)
    assert done.returncode == 0, done.stderr
    made = [line for line in done.stdout.splitlines() if " at step " in line]
    assert [line.split()[0] for line in made] == ["lr", "aux_loss_coef", "dropout"], done.stdout
    changed_at = int(made[0].split(" at step ")[1].split()[0])
    assert "lr 0.003 -> 0.001" in made[0] and changed_at >= 60
    os.kill(read_status(Run.open(runs, "killed")).pid, signal.SIGKILL)  # before the next checkpoint, at 100
    wait_until(lambda: read_status(Run.open(runs, "killed")).state == "crashed", 60, "the trainer to die")
    assert "lr = 0.001" in (killed / "config.toml").read_text()  # the current values, for the resume

    # Resumed in this process, on one thread as the trainer ran (its being a process is not tested here).
    moe_tui_here(runs, "resumed", "train", "--resume", "killed", "--headless", threads=1)
    # Resumed from step 50, the change logged after it is made again at its step; its events stay in the
    # log, once each (a resume cut short again still finds them).
    again = records(killed, "SettingsChanged")
    assert [(r["step"], r["key"], r["new"]) for r in again] == [
        (changed_at, "lr", 0.001),
        (changed_at, "aux_loss_coef", 0.05),
        (changed_at, "dropout", 0.2),
    ]
    assert all(r["source"] == "moe-tui set" for r in again), again

    # The run that never stopped: the same flags to the step of the change, then those settings on.
    moe_tui_here(runs, "straight", "train", "simpsons", *as_flags({**STEER, "max_iters": changed_at}),
                 "--run-name", "straight", "--headless", threads=1)  # fmt: skip
    moe_tui_here(runs, "rest", "train", "--resume", "straight", "--max-iters", "150", "--lr", "0.001",
                 "--aux-loss-coef", "0.05", "--dropout", "0.2", "--headless", threads=1)  # fmt: skip
    ours = load_file(killed / "checkpoints" / "step-00000150" / MODEL_FILE)
    theirs = load_file(runs / "straight" / "checkpoints" / "step-00000150" / MODEL_FILE)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_paused_run_takes_a_change_before_its_next_step(tmp_path):
    runs = tmp_path / "runs"
    proc = start_moe_tui(
        ["train", "simpsons", *as_flags({**TINY, "max_iters": 100_000}), "--run-name", "live", "--headless"], runs
    )
    live, run = runs / "live", Run.open(runs, "live") if (runs / "live").exists() else None
    try:
        wait_until(lambda: steps_logged(live) >= 10, 120, "training")
        run = Run.open(runs, "live")
        client = live_client(run)
        client.send("pause")
        assert client.wait_for(lambda m: m.get("event", {}).get("state") == "paused", timeout=30) is not None
        client.close()
        paused_at = live_client(run).hello["step"]  # a new greeting: the step it stands at
        done = moe_tui(runs, "set", "live", "warmup_iters=5", "eval_interval=7")
        assert done.returncode == 0, done.stderr
        assert [(r["step"], r["key"]) for r in records(live, "SettingsChanged")] == [
            (paused_at, "warmup_iters"),
            (paused_at, "eval_interval"),
        ]
        client = live_client(run)
        client.send("resume")
        client.close()
        wait_until(lambda: any(r["step"] % 7 == 0 for r in records(live, "EvalMetrics")), 120, "an eval at 7k")
        assert "eval_interval = 7" in (live / "config.toml").read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)


# Each rank notes, through a sitecustomize module on PYTHONPATH, the step at which it takes a change.
RECORD_CHANGES = """
import os
if os.environ.get("RANK") is not None:
    from moe_core.train import learner
    apply = learner.Learner.apply_settings
    def noted(self, changes):
        if changes:
            with open(os.environ["MOE_TUI_CHANGES"], "a") as f:
                f.write(f"{os.environ['RANK']} {self.step_num} {','.join(sorted(changes))} {self.config.lr}\\n")
        return apply(self, changes)
    learner.Learner.apply_settings = noted
"""


def test_with_two_processes_every_rank_takes_a_change_between_the_same_two_steps(tmp_path):
    """Data parallel: the change travels with the commands the ranks agree on."""
    runs, hooks, noted = tmp_path / "runs", tmp_path / "hooks", tmp_path / "changes.txt"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(RECORD_CHANGES)
    # One torch thread per rank (see tests/ranks.py).
    env = {"PYTHONPATH": str(hooks), "MOE_TUI_CHANGES": str(noted), "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return moe_tui(runs, *args, env=env)

    started = run("train", "simpsons", *DP_FLAGS, "--max-iters", "100000", "--run-name", "two", "--nproc", "2",
                  "--detach")  # fmt: skip
    assert started.returncode == 0, started.stderr
    wait_until(lambda: steps_logged(runs / "two") >= 10, 120, "two processes training")
    done = run("set", "two", "lr=0.0005", "aux_loss_coef=0.5")
    assert done.returncode == 0, done.stderr
    changed_at = int(done.stdout.split(" at step ")[1].split()[0])
    assert run("stop", "two").returncode == 0
    # Each rank took both between the same two steps; rank 0 alone logged them.
    assert sorted(noted.read_text().splitlines()) == [
        f"0 {changed_at} aux_loss_coef,lr 0.003",
        f"1 {changed_at} aux_loss_coef,lr 0.003",
    ]
    assert [(r["step"], r["key"]) for r in records(runs / "two", "SettingsChanged")] == [
        (changed_at, "lr"),
        (changed_at, "aux_loss_coef"),
    ]
