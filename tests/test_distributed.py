"""Data parallelism with real processes: torchrun's launcher (`--nproc`, and torchrun itself), gloo over
loopback on the CPU, tiny models.

About the tolerances. Two processes compute each gradient as the mean of two half-batch gradients,
one process as one whole-batch gradient: the same sums in another order, so the weights differ by
float rounding (1e-7 after the first steps, checked below). Training then amplifies rounding, and a
sparse MoE more than most: a token whose top two router logits are within rounding of each other goes
to another expert. For scale, the same one-process run with 2 torch threads instead of 1 (another
summation order, nothing else) ends 40 steps 1.4e-3 away in the weights and 4e-4 in eval loss on
this machine. The settings below (a long warmup, so the learning rate stays low over the 40 steps
while the loss still falls from 4.7 to 3.9) keep that amplification small enough for a bound of 1e-4
on the eval losses; the weights must be within 1e-3, no further than that thread-count noise.
"""

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

import pytest
import torch
from safetensors.torch import load_file

from moe_core.errors import UserError
from moe_core.parallel import ranks as distributed
from moe_core.store.checkpoint import load_checkpoint
from tests.conftest import REPO, TINY, as_flags, shared_data_dir

DP = {**TINY, "warmup_iters": 400, "eval_interval": 20, "ckpt_interval": 20, "max_iters": 40}
DP_FLAGS = as_flags(DP)
QUIET = [
    "--max-iters",
    "100000",
    "--eval-interval",
    "100000",
    "--sample-interval",
    "100000",
    "--ckpt-interval",
    "100000",
    "--log-interval",
    "5",
]


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


def records(run: Path, event: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def evals(run: Path) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["train_loss"], r["val_loss"]) for r in records(run, "EvalMetrics")}


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors")


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The reference: one process, 40 steps."""
    runs = tmp_path_factory.mktemp("straight")
    done = train([*DP_FLAGS, "--run-name", "one"], runs)
    assert done.returncode == 0, done.stderr
    return runs / "one"


class Trained(NamedTuple):
    run: Path
    done: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def data_parallel(tmp_path_factory) -> Trained:
    """The same 40 steps on two processes, data parallel."""
    runs = tmp_path_factory.mktemp("data-parallel")
    return Trained(runs / "two", train([*DP_FLAGS, "--run-name", "two", "--nproc", "2"], runs))


@pytest.fixture(scope="module")
def expert_parallel(tmp_path_factory) -> Trained:
    """The same 40 steps on two processes holding two experts each, with a sample at step 20 (every expert
    gathered to rank 0 and back) in the middle of the run."""
    runs = tmp_path_factory.mktemp("expert-parallel")
    flags = [*DP_FLAGS, "--run-name", "ep", "--nproc", "2", "--expert-parallel", "--sample-interval", "20"]
    return Trained(runs / "ep", train(flags, runs))


def cut_copy(run: Path, to: Path, step: int) -> Path:
    """A copy of `run` as a run stopped after its checkpoint of `step`: the later step checkpoints gone
    (what a crash after them leaves is tested in test_faults.py; a resume starts from the newest left)."""
    shutil.copytree(run, to)
    for folder in (to / "checkpoints").glob("step-*"):
        if int(folder.name[5:]) > step:
            shutil.rmtree(folder)
    return to


def test_two_processes_follow_the_one_process_run(straight, data_parallel):
    run, done = data_parallel
    assert done.returncode == 0, done.stderr
    # Rank 0 alone reports: one line per event, and nothing at all on stderr but the closing hint.
    assert done.stdout.count("training run 'two'") == 1 and "device cpu x 2" in done.stdout
    assert done.stdout.count("eval     40") == 1 and done.stdout.count("sample @ step 40") == 1
    assert done.stderr.strip() == "run two finished at step 40; sample from it with: moe-tui sample two"
    one, two = evals(straight), evals(run)
    assert sorted(one) == sorted(two) == [20, 40]
    for step in (20, 40):
        assert one[step] == pytest.approx(two[step], abs=1e-4), step
    first = {r["step"]: r for r in records(straight, "StepMetrics")}[10]
    again = {r["step"]: r for r in records(run, "StepMetrics")}[10]
    for key in ("loss", "aux_loss", "z_loss", "grad_norm"):  # before rounding has been amplified
        assert first[key] == pytest.approx(again[key], rel=1e-5), key
    a, b = weights(straight, 40), weights(run, 40)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
    # The expert shares shown are the global batch's: they sum to 1 and match one process's.
    shares = [r["layers"][0]["expert_fraction"] for r in records(run, "RouterStats")]
    reference = [r["layers"][0]["expert_fraction"] for r in records(straight, "RouterStats")]
    assert shares[0] == pytest.approx(reference[0], abs=1e-6) and sum(shares[0]) == pytest.approx(1.0)


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


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)], ids=["2-then-1", "1-then-2"])
def test_stopped_with_sigterm_and_resumed_on_another_count_it_matches_a_straight_run(first, then, straight, tmp_path):
    nproc = lambda n: ["--nproc", str(n)] if n > 1 else []  # noqa: E731
    process = start(["train", "simpsons", *DP_FLAGS, "--run-name", "split", *nproc(first), "--headless"], tmp_path)
    wait_for_line(process, r"^step +10 ")
    process.send_signal(signal.SIGTERM)  # to the launcher with --nproc: torchrun passes it to the ranks
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    stopped = int(re.search(r"saved checkpoint at step (\d+)", out).group(1))
    assert 10 <= stopped < 40 and "resume with: moe-tui train --resume split" in err
    done = train(["--resume", "split", *nproc(then)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"resuming at step {stopped}" in done.stdout
    run = tmp_path / "split"
    steps = [r["step"] for r in records(run, "StepMetrics")]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # the steps continue, none twice
    # Within the rounding noise of the introduction: this run changed summation order mid-way, at a
    # step that varies, so it gets the thread-count noise's bound (4e-4 in eval loss, 1.4e-3 in the
    # weights) with a margin, not the 1e-4 of the fixed comparison above.
    assert evals(straight)[40] == pytest.approx(evals(run)[40], abs=1e-3)
    a, b = weights(straight, 40), weights(run, 40)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 3e-3


def test_expert_parallel_follows_the_one_process_run_and_saves_what_one_process_saves(straight, expert_parallel):
    # Same routing, capacity and losses as data parallelism; only where the experts live differs, so the
    # same tolerances hold (see the top of this file).
    run, done = expert_parallel
    assert done.returncode == 0, done.stderr
    assert "device cpu x 2, 2 experts each" in done.stdout and done.stdout.count("sample @ step") == 2
    # Step 10, before rounding has been amplified: the experts' gradients (divided by the number of
    # processes) and the clipping norm (summed over them) are one process's.
    first = {r["step"]: r for r in records(straight, "StepMetrics")}[10]
    again = {r["step"]: r for r in records(run, "StepMetrics")}[10]
    for key in ("loss", "aux_loss", "z_loss", "grad_norm"):
        assert first[key] == pytest.approx(again[key], rel=1e-5), key
    for step in (20, 40):
        assert evals(straight)[step] == pytest.approx(evals(run)[step], abs=1e-4), step
    a, b = weights(straight, 40), weights(run, 40)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}  # every expert, gathered
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
    # Adam's moments, every expert's too, relative to each tensor's scale (exp_avg_sq is ~1e-6).
    moments = [load_checkpoint(r / "checkpoints" / "step-00000040")[1]["optimizer"]["state"] for r in (straight, run)]
    assert moments[0].keys() == moments[1].keys()
    assert (
        max(
            ((moments[0][i][m] - moments[1][i][m]).abs().max() / moments[0][i][m].abs().max()).item()
            for i in moments[0]
            for m in ("exp_avg", "exp_avg_sq")
        )
        < 2e-2
    )


CAPPED = [*DP_FLAGS, "--capacity-factor", "1.0", "--max-iters", "20"]


@pytest.fixture(scope="module")
def by_torchrun(tmp_path_factory) -> Trained:
    """20 steps data parallel with capacity, launched by torchrun itself, as docs/parallel.md shows."""
    runs = tmp_path_factory.mktemp("torchrun")
    process = start(
        ["train", "simpsons", *CAPPED, "--run-name", "dp", "--headless"],
        runs,
        launcher=["torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    )
    out, err = process.communicate(timeout=300)
    return Trained(runs / "dp", subprocess.CompletedProcess(process.args, process.returncode, out, err))


def test_with_capacity_expert_parallel_drops_what_data_parallel_drops(by_torchrun, tmp_path):
    # Capacity caps each expert per rank's slice in both, before any row leaves its rank.
    assert by_torchrun.done.returncode == 0, by_torchrun.done.stderr
    assert train([*CAPPED, "--nproc", "2", "--run-name", "ep", "--expert-parallel"], tmp_path).returncode == 0
    dropped = [
        [layer["dropped_fraction"] for r in records(run, "RouterStats") for layer in r["layers"]]
        for run in (by_torchrun.run, tmp_path / "ep")
    ]
    assert dropped[0] == pytest.approx(dropped[1], abs=1e-6) and max(dropped[0]) > 0  # something was dropped
    assert evals(by_torchrun.run)[20] == pytest.approx(evals(tmp_path / "ep")[20], abs=1e-4)


@pytest.mark.parametrize(
    "first,then",
    [
        ("expert_parallel", []),
        ("straight", ["--nproc", "2", "--expert-parallel"]),
        ("data_parallel", ["--nproc", "2", "--expert-parallel"]),
    ],
    ids=["experts-split-then-1", "1-then-experts-split", "data-parallel-then-experts-split"],
)
def test_a_run_moves_between_expert_parallel_and_one_process_through_its_checkpoints(
    first, then, straight, request, tmp_path
):
    # The first 20 steps are those of a run above, trained that way: its checkpoint of step 20.
    source = request.getfixturevalue(first)
    cut_copy(source if isinstance(source, Path) else source.run, tmp_path / "moved", 20)
    done = train(["--resume", "moved", "--max-iters", "40", *then], tmp_path)
    assert done.returncode == 0 and "resuming at step 20" in done.stdout, done.stderr
    assert evals(straight)[40] == pytest.approx(evals(tmp_path / "moved")[40], abs=1e-3)
    a, b = weights(straight, 40), weights(tmp_path / "moved", 40)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 3e-3


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
        ["train", "simpsons", *as_flags(TINY), *QUIET, "--run-name", "s", "--nproc", "2", "--headless"], tmp_path
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


@pytest.mark.parametrize("split", [[], ["--expert-parallel"]], ids=["data-parallel", "experts-split"])
def test_resumed_on_as_many_processes_with_dropout_and_router_noise_it_is_the_straight_run_exactly(split, tmp_path):
    # Each rank draws its own dropout masks and router noise; a step checkpoint keeps every rank's
    # stream, so that the resumed ranks draw what they would have drawn. (warmup_iters 400: the
    # learning rate at each step does not depend on --max-iters.)
    noisy = [*DP_FLAGS, "--dropout", "0.1", "--router", "noisy_topk", "--nproc", "2", *split]
    straight = train([*noisy, "--run-name", "straight"], tmp_path)
    assert straight.returncode == 0, straight.stderr
    cut_copy(tmp_path / "straight", tmp_path / "resumed", 20)  # as if stopped after its checkpoint of step 20
    done = train(["--resume", "resumed", "--max-iters", "40", "--nproc", "2", *split], tmp_path)
    assert done.returncode == 0 and "resuming at step 20" in done.stdout, done.stderr
    a, b = weights(tmp_path / "straight", 40), weights(tmp_path / "resumed", 40)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert evals(tmp_path / "straight")[40] == evals(tmp_path / "resumed")[40]


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


def test_a_rank_that_fails_alone_brings_every_rank_down_at_once_and_the_run_resumes(tmp_path):
    # Out of memory on one GPU in the middle of an evaluation: rank 0 is already inside a collective
    # that rank 1 will never join. Rank 1 leaves at once instead of waiting out COLLECTIVE_TIMEOUT.
    started = time.monotonic()
    done = train(
        [*DP_FLAGS, "--run-name", "f", "--nproc", "2"],
        tmp_path,
        timeout=120,
        env=faults(tmp_path, "eval-fails-on-rank-1"),
    )
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
        ["train", "simpsons", *as_flags(TINY), *QUIET, "--run-name", "k", "--nproc", "2", "--headless"], tmp_path
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


def test_torchrun_itself_runs_the_headless_reporter_on_rank_0_only(by_torchrun):
    (run, done), out = by_torchrun, by_torchrun.done.stdout
    assert done.returncode == 0, done.stderr
    assert out.count("training run 'dp'") == 1 and out.count("eval     20") == 1 and "finished" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "step-00000020"]


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


def test_several_processes_detached_train_on_after_the_command_returns_and_stop_on_request(tmp_path):
    try:
        started = start(
            ["train", "simpsons", *as_flags(TINY), *QUIET, "--run-name", "bg", "--nproc", "2", "--detach"], tmp_path
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


def test_two_machines_train_as_one_with_the_readme_command(straight, tmp_path):
    nodes = two_machines(["simpsons", *DP_FLAGS, "--run-name", "nodes"], tmp_path, (REPO, tmp_path))
    (out0, err0), (out1, err1) = finish(nodes, timeout=300)
    assert [p.returncode for p in nodes] == [0, 0], err0 + err1
    assert out0.count("training run 'nodes'") == 1 and "device cpu x 2" in out0
    assert out1 == ""  # the other machine's process prints nothing but errors
    for step in (20, 40):
        assert evals(straight)[step] == pytest.approx(evals(tmp_path / "nodes")[step], abs=1e-4), step
    # The same command again: rank 0 refuses (the run exists), and machine 1 hears of it, not a hang.
    started = time.monotonic()
    nodes = two_machines(["simpsons", *DP_FLAGS, "--run-name", "nodes"], tmp_path, (REPO, tmp_path))
    (_, err0), (_, err1) = finish(nodes, timeout=200)
    assert all(p.returncode != 0 for p in nodes) and time.monotonic() - started < 150
    said = [line for line in err0.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and "run 'nodes' already exists" in said[0], err0
    heard = [line for line in err1.splitlines() if line.startswith("error:")]
    # Told by rank 0 through the store, or, had machine 0's torchrun and its store gone first, losing them.
    assert len(heard) == 1 and (
        "process 0 of 2 could not start: run 'nodes' already exists" in heard[0]
        or "lost contact with the other machines' processes" in heard[0]
    ), err1


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


TMUX = shutil.which("tmux")
MOE_TUI = Path(sys.executable).with_name("moe-tui")


@pytest.mark.skipif(TMUX is None or not MOE_TUI.is_file(), reason="needs tmux and the moe-tui console script")
def test_the_dashboard_drives_two_processes_in_a_real_terminal(tmp_path):
    from tests.test_tmux import Terminal

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
            *QUIET,
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


# -- what can only be checked apart from a real run here (no GPUs, one kind of device) -------------


def test_a_process_per_gpu_and_one_kind_of_device():
    with pytest.raises(UserError, match=r"--nproc 4 asks for more processes than the 2 CUDA GPU\(s\)"):
        distributed.check_cuda_count(4, 2)
    distributed.check_cuda_count(2, 2)
    with pytest.raises(UserError, match=r"rank 0 cuda, rank 1 cpu\); give every process the same --device"):
        distributed.check_same_devices(["cuda", "cpu"])
    distributed.check_same_devices(["cpu", "cpu"])


def test_each_rank_takes_its_slice_of_the_same_global_batch():
    rows = torch.arange(12).reshape(6, 2)
    parts = [distributed.Ranks(r, 3).shard(rows) for r in range(3)]
    assert torch.equal(torch.cat(parts), rows)
    assert distributed.SINGLE.shard(rows) is rows


CAPACITY_FACTORS = {"dropless": 0.0, "capacity": 1.0}


def _dispatch_on_two_ranks(rank: int, init: str, results: str) -> None:
    """One rank of `test_the_expert_parallel_dispatch_is_the_layer_on_one_process`: each capacity factor
    in the one process group (starting processes is what costs here)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    for name, capacity_factor in CAPACITY_FACTORS.items():
        _dispatch_once(rank, capacity_factor, f"{results}-{name}")
    dist.destroy_process_group()


def _dispatch_once(rank: int, capacity_factor: float, results: str) -> None:
    from moe_core.config import Config
    from moe_core.model.moe import MoE
    from moe_core.parallel.experts import ExpertParallel
    from moe_core.parallel.ranks import Ranks

    torch.manual_seed(0)  # the same layer on both ranks
    # 6 channels: rows too narrow for the grouped matmul, so the experts run as per-expert F.linear,
    # which autocast turns to bf16, as CUDA's grouped matmul always is.
    layer = MoE(6, num_experts=4, top_k=2, capacity_factor=capacity_factor)
    whole = MoE(6, num_experts=4, top_k=2, capacity_factor=capacity_factor)
    whole.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(rank))  # each rank its own tokens
    holder = torch.nn.Module()
    holder.moe = layer
    ExpertParallel(
        Ranks(rank, 2),
        Config(num_experts=4, top_k=2, n_embd=6, n_head=1),
        holder,
        torch.optim.AdamW(holder.parameters()),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        split, alone = layer(x), whole(x)
    split.sum().backward()
    alone.sum().backward()
    torch.save(
        {
            "split": split.detach(),
            "alone": alone.detach(),
            "dtype": str(split.dtype),
            "grad": layer.experts.w1.grad,
            "whole_grad": whole.experts.w1.grad,
        },
        f"{results}-{rank}.pt",
    )


@pytest.fixture(scope="module")
def dispatched(tmp_path_factory) -> Path:
    """What each of two ranks computed, for each capacity factor, in `r-NAME-RANK.pt`."""
    folder = tmp_path_factory.mktemp("dispatch")
    torch.multiprocessing.spawn(_dispatch_on_two_ranks, nprocs=2, args=(f"file://{folder / 'init'}", str(folder / "r")))
    return folder


@pytest.mark.parametrize("name", CAPACITY_FACTORS)
def test_the_expert_parallel_dispatch_is_the_layer_on_one_process(name, dispatched):
    # Each rank's output equals the whole layer's on its tokens, in the input's dtype under bf16
    # autocast; each rank's expert gradients are its share of the two ranks' summed gradients (the
    # trainer divides them by 2, as it averages the replicated ones).
    ranks = [torch.load(dispatched / f"r-{name}-{rank}.pt") for rank in (0, 1)]
    for r in ranks:
        assert r["dtype"] == "torch.float32"
        assert torch.allclose(r["split"], r["alone"], atol=2e-2)  # bf16 rounding, different row groupings
    summed = ranks[0]["whole_grad"] + ranks[1]["whole_grad"]  # (4 experts, ...): both ranks' tokens
    for rank, r in enumerate(ranks):
        assert r["grad"].shape[0] == 2  # its own two experts only
        assert torch.allclose(r["grad"], summed[2 * rank : 2 * rank + 2], atol=5e-2, rtol=2e-2)
