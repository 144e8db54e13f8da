"""Data parallelism with real processes: torchrun's launcher (`--nproc`, and torchrun itself), gloo over
loopback on the CPU, tiny models.

About the tolerances. Two processes compute each gradient as the mean of two half-batch gradients,
one process as one whole-batch gradient: the same sums in another order, so the weights differ by
float rounding (1e-7 after the first steps, checked below). Training then amplifies rounding, and a
sparse MoE more than most: a token whose top two router logits are within rounding of each other goes
to another expert. For scale, the same one-process run with 2 torch threads instead of 1 (another
summation order, nothing else) ends 40 steps 1.4e-3 away in the weights and 4e-4 in eval loss on
this machine. The settings of tests/ranks.py's DP (a long warmup, so the learning rate stays low over
the 40 steps while the loss still falls from 4.7 to 3.9) keep that amplification small enough for a
bound of 1e-4 on the eval losses; the weights must be within 1e-3, no further than that thread-count noise.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from moe_core.errors import UserError
from moe_core.parallel import ranks as distributed
from moe_core.store.checkpoint import load_checkpoint
from tests.conftest import REPO, moe_tui_here
from tests.expert_dispatch import CAPACITY_FACTORS, dispatch_on_two_ranks
from tests.ranks import (
    DP_FLAGS,
    Trained,
    cut_copy,
    evals,
    finish,
    records,
    start,
    stdout_of_training,
    train,
    two_machines,
    wait_for_line,
    weights,
)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The reference: one process (this one, on one thread, as each rank), 40 steps."""
    runs = tmp_path_factory.mktemp("straight")
    moe_tui_here(runs, "one", "train", "simpsons", *DP_FLAGS, "--run-name", "one", "--headless", threads=1)
    return runs / "one"


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


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)], ids=["2-then-1", "1-then-2"])
def test_stopped_with_sigterm_and_resumed_on_another_count_it_matches_a_straight_run(first, then, straight, tmp_path):
    nproc = lambda n: ["--nproc", str(n)] if n > 1 else []  # noqa: E731
    process = start(["train", "simpsons", *DP_FLAGS, "--run-name", "split", *nproc(first), "--headless"], tmp_path)
    wait_for_line(process, r"^step +10 ")
    process.send_signal(signal.SIGTERM)  # to the launcher with --nproc: torchrun passes it to the ranks
    out, err = process.communicate(timeout=120)
    saved = re.search(r"saved checkpoint at step (\d+)", out)
    assert process.returncode == 143 and saved, out + err
    stopped = int(saved.group(1))
    assert 10 <= stopped < 40 and "resume with: moe-tui train --resume split" in err
    assert f"resuming at step {stopped}" in stdout_of_training(["--resume", "split", *nproc(then)], tmp_path)
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
    assert "resuming at step 20" in stdout_of_training(["--resume", "moved", "--max-iters", "40", *then], tmp_path)
    assert evals(straight)[40] == pytest.approx(evals(tmp_path / "moved")[40], abs=1e-3)
    a, b = weights(straight, 40), weights(tmp_path / "moved", 40)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 3e-3


def test_torchrun_itself_runs_the_headless_reporter_on_rank_0_only(by_torchrun):
    (run, done), out = by_torchrun, by_torchrun.done.stdout
    assert done.returncode == 0, done.stderr
    assert out.count("training run 'dp'") == 1 and out.count("eval     20") == 1 and "finished" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "step-00000020"]


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


@pytest.fixture(scope="module")
def dispatched(tmp_path_factory) -> Path:
    """What each of two ranks computed, for each capacity factor, in `r-NAME-RANK.pt`."""
    folder = tmp_path_factory.mktemp("dispatch")
    torch.multiprocessing.spawn(dispatch_on_two_ranks, nprocs=2, args=(f"file://{folder / 'init'}", str(folder / "r")))
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
