"""Process groups stopped, killed and failing: signals to the launcher or any rank, a rank that fails or
dies alone, a file one machine lacks, detached ranks, the dashboard over two processes; and a run stopped
and resumed on as many processes drawing what it would have drawn (see tests/ranks.py for the helpers)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from moe_core.parallel import ranks as distributed
from moe_core.store.checkpoint import load_checkpoint
from tests.conftest import QUIET_FLAGS, TINY, as_flags, shared_data_dir
from tests.ranks import (
    DP_FLAGS,
    cut_copy,
    environment,
    evals,
    finish,
    processes_of,
    rank_pids,
    records,
    start,
    train,
    two_machines,
    wait_for_line,
    weights,
)
from tests.test_tmux import MOE_TUI, TMUX, Terminal


@pytest.mark.parametrize(
    "target,sig",
    [
        ("launcher", signal.SIGINT),
        ("every process", signal.SIGINT),
        ("rank 0", signal.SIGTERM),
        ("rank 1", signal.SIGTERM),
        ("rank 1", signal.SIGINT),
    ],
    ids=lambda v: v if isinstance(v, str) else v.name,
)
def test_a_stop_signal_to_the_launcher_or_any_rank_saves_and_all_exit_with_its_code(target, sig, tmp_path):
    process = start(
        ["train", "simpsons", *as_flags(TINY), *QUIET_FLAGS, "--run-name", "s", "--nproc", "2", "--headless"], tmp_path
    )
    try:
        wait_for_line(process, r"^step +10 ")
        if target == "every process":  # as `pkill -INT -f moe-tui` would: rank 1 may act on it first
            for pid in [process.pid, *rank_pids(process.pid).values()]:
                os.kill(pid, sig)
        else:
            os.kill(process.pid if target == "launcher" else rank_pids(process.pid)[int(target[-1])], sig)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + sig, err
    stopped = int(re.search(r"saved checkpoint at step (\d+)", out).group(1))
    assert out.rstrip().endswith(
        f"stopped: {sig.name[3:].lower()} received" + (" by rank 1" if target == "rank 1" else "")
    )
    assert err.strip() == "resume with: moe-tui train --resume s --nproc 2"  # nothing else, from any rank
    assert [p.name for p in (tmp_path / "s" / "checkpoints").iterdir()] == [f"step-{stopped:08d}"]


# Each rank draws its own dropout masks and router noise; a step checkpoint keeps every rank's stream, so
# that the resumed ranks draw what they would have drawn. (warmup_iters 400: the learning rate at each
# step does not depend on --max-iters.) Data parallel, this is checked on a run that really failed, below.
NOISY = [*DP_FLAGS, "--dropout", "0.1", "--router", "noisy_topk", "--nproc", "2"]


def assert_same_run(one: Path, other: Path, step: int) -> None:
    a, b = weights(one, step), weights(other, step)
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], "weights differ"
    assert evals(one)[step] == evals(other)[step]


def test_resumed_with_its_experts_split_over_as_many_processes_it_is_the_straight_run_exactly(tmp_path):
    straight = train([*NOISY, "--expert-parallel", "--run-name", "straight"], tmp_path)
    assert straight.returncode == 0, straight.stderr
    cut_copy(tmp_path / "straight", tmp_path / "resumed", 20)  # as if stopped after its checkpoint of step 20
    done = train(["--resume", "resumed", "--max-iters", "40", "--nproc", "2", "--expert-parallel"], tmp_path)
    assert done.returncode == 0 and "resuming at step 20" in done.stdout, done.stderr
    assert_same_run(tmp_path / "straight", tmp_path / "resumed", 40)


# Faults injected into the ranks through a sitecustomize module on PYTHONPATH, chosen by MOE_TUI_FAULT.
FAULTS = """
import os, signal, time
fault, rank = os.environ.get("MOE_TUI_FAULT"), os.environ.get("RANK")
if fault and rank is not None:
    from moe_core.train import checkpoint_writer
    from moe_core.train import trainer
    if fault == "eval-fails-on-rank-1" and rank == "1":
        evaluate = trainer.Trainer.evaluate
        def failing(self):
            if self.step_num == 40:
                raise RuntimeError("CUDA out of memory (injected on rank 1 only)")
            return evaluate(self)
        trainer.Trainer.evaluate = failing
    if fault == "slow-disk-then-rank-1-dies":
        if rank == "0":  # the step-20 checkpoint takes 3 s to write
            write = checkpoint_writer.Snapshot.write
            def slow(self):
                time.sleep(3 if self.step == 20 and not self.best else 0)
                return write(self)
            checkpoint_writer.Snapshot.write = slow
        else:  # rank 1 dies right after the step-20 save was taken
            save = trainer.Trainer._save_or_warn
            def save_then_die(self, best):
                save(self, best)
                if self.step_num == 20 and not best:
                    os.kill(os.getpid(), signal.SIGKILL)
            trainer.Trainer._save_or_warn = save_then_die
"""


def faults(tmp_path: Path, fault: str) -> dict:
    folder = tmp_path / "faults"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(FAULTS)
    return {"PYTHONPATH": str(folder), "MOE_TUI_FAULT": fault}


def test_a_rank_that_fails_alone_brings_every_rank_down_at_once_and_the_run_resumes_as_if_it_had_not(tmp_path):
    # Out of memory on one GPU in the middle of an evaluation: rank 0 is already inside a collective
    # that rank 1 will never join. Rank 1 leaves at once instead of waiting out COLLECTIVE_TIMEOUT.
    started = time.monotonic()
    done = train([*NOISY, "--run-name", "f"], tmp_path, timeout=120, env=faults(tmp_path, "eval-fails-on-rank-1"))
    took = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert (
        "error: process 1 of 2 failed at step 40 (CUDA out of memory (injected on rank 1 only)); the others "
        "stop too; resume from the last checkpoint"
    ) in done.stderr
    assert took < distributed.COLLECTIVE_TIMEOUT.total_seconds() / 3
    resumed = train(["--resume", "f", "--nproc", "2"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 20" in resumed.stdout and "eval     40" in resumed.stdout
    # With dropout and router noise, the run that failed and resumed is the one that never failed.
    straight = train([*NOISY, "--run-name", "straight"], tmp_path)
    assert straight.returncode == 0, straight.stderr
    assert_same_run(tmp_path / "straight", tmp_path / "f", 40)


def test_a_checkpoint_being_written_when_a_rank_dies_is_written_before_rank_0_leaves(tmp_path):
    done = train(
        [*DP_FLAGS, "--run-name", "w", "--nproc", "2"],
        tmp_path,
        timeout=120,
        env=faults(tmp_path, "slow-disk-then-rank-1-dies"),
    )
    assert done.returncode == 1 and "process 1 of 2" in done.stderr and "SIGKILL" in done.stderr, done.stderr
    load_checkpoint(tmp_path / "w" / "checkpoints" / "step-00000020")  # whole, 3 s after rank 1 died


KILL_DEADLINE = 30.0  # seconds from kill -9 of a rank to every process gone; measured: about 1


def test_kill_9_of_one_rank_brings_the_others_down_naming_it(tmp_path):
    process = start(
        ["train", "simpsons", *as_flags(TINY), *QUIET_FLAGS, "--run-name", "k", "--nproc", "2", "--headless"], tmp_path
    )
    try:
        wait_for_line(process, r"^step +10 ")
        ranks = rank_pids(process.pid)
        assert sorted(ranks) == [0, 1]
        killed = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        out, err = process.communicate(timeout=KILL_DEADLINE)
        took = time.monotonic() - killed
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 1 and took < KILL_DEADLINE
    said = [line for line in err.splitlines() if line.startswith("error:")]
    assert said == [
        f"error: process 1 of 2 (pid {ranks[1]}) was killed by SIGKILL, and the others were stopped; "
        "resume from the last checkpoint with: moe-tui train --resume k --nproc 2"
    ], err  # one line
    assert not Path(f"/proc/{ranks[0]}").exists() or "zombie" in Path(f"/proc/{ranks[0]}/status").read_text()


def test_several_processes_detached_train_on_after_the_command_returns_and_stop_on_request(tmp_path):
    try:
        started = start(
            ["train", "simpsons", *as_flags(TINY), *QUIET_FLAGS, "--run-name", "bg", "--nproc", "2", "--detach"],
            tmp_path,
        )
        out, err = started.communicate(timeout=120)  # returns as soon as rank 0 trains
        assert started.returncode == 0 and err == "", err
        assert "in the background as process" in out and "moe-tui watch bg" in out and "moe-tui stop bg" in out
        run = tmp_path / "bg"
        deadline = time.monotonic() + 120
        while not any(r["step"] >= 20 for r in records(run, "StepMetrics")):  # training goes on without it
            assert time.monotonic() < deadline and len(processes_of(tmp_path)) == 3  # the launcher and 2 ranks
            time.sleep(0.2)
        assert records(run, "RunStarted")[0]["device"] == "cpu x 2"
        stop = start(["stop", "bg"], tmp_path)
        assert stop.wait(timeout=120) == 0, stop.stderr.read()
        deadline = time.monotonic() + 60
        while processes_of(tmp_path):  # every process ends
            assert time.monotonic() < deadline, processes_of(tmp_path)
            time.sleep(0.2)
        log = (run / "train.log").read_text()
        saved = int(re.search(r"saved checkpoint at step (\d+)", log).group(1))
        assert (run / "checkpoints" / f"step-{saved:08d}").is_dir() and "error" not in log, log
    finally:
        for pid in processes_of(tmp_path):
            os.kill(pid, signal.SIGKILL)


def test_a_file_missing_on_one_machine_stops_both_at_once_each_saying_why(tmp_path):
    here, there = tmp_path / "machine0", tmp_path / "machine1"
    here.mkdir(), there.mkdir()
    shutil.copy(shared_data_dir() / "moes_tavern_lines.txt", here / "lines.txt")  # not copied to machine 1
    started = time.monotonic()
    nodes = two_machines(["lines.txt", *DP_FLAGS, "--run-name", "missing"], tmp_path / "runs", (here, there))
    (_, err0), (out1, err1) = finish(nodes, timeout=120)
    took = time.monotonic() - started
    assert all(p.returncode != 0 for p in nodes) and took < 150  # not COLLECTIVE_TIMEOUT's 5 minutes
    ours = [line for line in err1.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "lines.txt" in ours[0], err1  # said on the machine that lacks the file...
    said = [line for line in err0.splitlines() if line.startswith("error:")]
    assert said == [f"error: process 1 of 2 could not start: {ours[0].removeprefix('error: ')}"], err0  # ...and on 0
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.skipif(TMUX is None or not MOE_TUI.is_file(), reason="needs tmux and the moe-tui console script")
def test_the_dashboard_drives_two_processes_in_a_real_terminal(tmp_path):
    terminal = Terminal(tmp_path)
    env = {k: v for k, v in environment(tmp_path / "runs").items() if k not in ("NO_COLOR", "TMUX")}
    command = " ".join(
        [
            str(MOE_TUI),
            "train",
            "simpsons",
            "--run-name",
            "dash",
            *as_flags(TINY),
            *QUIET_FLAGS,
            "--nproc",
            "2",
            "--on-hangup",
            "stop",
        ]
    )
    try:
        terminal.start(f"{command}; echo exit=$?; sleep 600", env)
        terminal.wait_for(r"RUNNING +step [1-9]\d*/100000", timeout=120)
        terminal.send("Space")  # pause: every rank stops between the same two steps
        screen = terminal.wait_for(r"PAUSED +step")
        paused_at = int(re.search(r"step (\d+)/100000", screen).group(1))
        terminal.send("c")
        terminal.wait_for(rf"saved step-{paused_at:08d}")
        terminal.send("q")
        terminal.wait_for(r"Stop training and quit\?")
        terminal.send("y")
        screen = terminal.wait_for(r"exit=\d+", timeout=120)
    finally:
        terminal.close()
    assert "exit=0" in screen, screen
    assert "resume with: moe-tui train --resume dash --nproc 2" in screen
    assert (tmp_path / "runs" / "dash" / "checkpoints" / f"step-{paused_at:08d}").is_dir()
