"""Fault injection on real processes: kill -9 at any instant, stop signals, a disk that refuses
checkpoint writes, and the leftovers a crash can leave in a run folder.

The promise under test: never lose more than the steps since the last checkpoint, never leave a run
that cannot be resumed, and resume to exactly the model an uninterrupted run would have made.
"""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

from moe_core.errors import UserError
from moe_core.events import Notice
from moe_core.store import checkpoint as checkpoint_module
from moe_core.store import runs as runs_module
from moe_core.store.checkpoint import MODEL_FILE, load_checkpoint, newest_intact, step_checkpoints
from moe_core.store.runs import Run
from moe_core.train import checkpoint_writer
from tests.conftest import ONE_THREAD, REPO, TINY, as_flags, moe_tui_here, start_moe_tui
from tests.test_training import make_trainer
from tui.cli import main


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def records(run: Path, event: str) -> list[dict]:
    return [r for r in Run(run).read_metrics() if r.get("event") == event]


def intact_or_count_corrupt(run: Path) -> tuple[int, int]:
    """(step of the newest intact checkpoint or -1, how many checkpoint folders are corrupt)."""
    root = run / "checkpoints"
    folders = [folder for _, folder in step_checkpoints(root)] + [root / "best"] * (root / "best").is_dir()
    corrupt = 0
    for folder in folders:
        try:
            load_checkpoint(folder)
        except UserError:
            corrupt += 1
    newest, _ = newest_intact(root)
    return (int(newest.name[5:]) if newest else -1), corrupt


# -- kill -9 ---------------------------------------------------------------------------------------


def kill_trials_settings(trials: int) -> dict:
    # A checkpoint every 5 steps (about 0.15 s), so that kills land in the middle of writes too.
    return {
        **TINY,
        "max_iters": 40 * trials,
        "ckpt_interval": 5,
        "keep_checkpoints": 3,
        "eval_interval": 40,
        "sample_interval": 60,
    }


@pytest.mark.parametrize("trials", [4, pytest.param(24, marks=pytest.mark.slow)])
def test_kill_9_at_any_instant_loses_nothing_and_resumes_exactly(trials, tmp_path, shared_dir):
    runs = tmp_path / "runs"
    flags = [*as_flags(kill_trials_settings(trials)), "--headless"]
    moe_tui_here(runs, "straight", "train", "simpsons", *flags, "--run-name", "straight", threads=1)

    rng = random.Random(trials)
    killed, last_checkpoint, corrupt_found, mid_write_kills, really_mid_write = runs / "killed", -1, 0, 0, 0
    for trial in range(trials):
        args = (
            ["train", "simpsons", *flags, "--run-name", "killed"]
            if trial == 0
            else ["train", "--resume", "killed", "--headless"]
        )
        log = tmp_path / f"trial-{trial}.log"
        with open(log, "w") as out:
            proc = start_moe_tui(args, runs, stdout=out, env=ONE_THREAD)
        wait_until(lambda: "run 'killed'" in log.read_text() or proc.poll() is not None, 120, "training to start")
        assert proc.poll() is None, f"trial {trial} ended early: {proc.stderr.read()}"
        root = killed / "checkpoints"  # this process writes a checkpoint to .tmp-NAME-PID, then renames it
        writing = lambda: (
            root.is_dir()
            and any(p.name.startswith(".tmp-") and p.name.endswith(f"-{proc.pid}") for p in os.scandir(root))
        )
        if trial % 2:  # kill in the middle of writing a checkpoint
            wait_until(writing, 60, "a checkpoint write")
            mid_write_kills += 1
        else:  # kill at a random instant
            time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
        really_mid_write += trial % 2 and writing()  # the half-written folder outlived the process

        newest, corrupt = intact_or_count_corrupt(killed)
        corrupt_found += corrupt
        assert newest >= last_checkpoint, f"trial {trial}: the newest checkpoint went back to step {newest}"
        last_checkpoint = newest
        Run.open(runs, "killed").load_vocab()  # the run folder stays usable

    # The last resume is not killed: it runs to the end in this process, on one thread as the others did.
    moe_tui_here(runs, "final", "train", "--resume", "killed", "--headless", threads=1)
    assert corrupt_found == 0
    assert really_mid_write * 2 >= mid_write_kills, (
        f"only {really_mid_write} of {mid_write_kills} kills meant for a checkpoint write landed during one"
    )

    # The resumed run is the uninterrupted one: same weights, same evaluations, same samples, and
    # every logged step exactly once.
    last = f"step-{40 * trials:08d}"
    ours = load_file(killed / "checkpoints" / last / MODEL_FILE)
    theirs = load_file(runs / "straight" / "checkpoints" / last / MODEL_FILE)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    evals = lambda run: [(r["step"], r["train_loss"], r["val_loss"]) for r in records(run, "EvalMetrics")]
    assert evals(killed) == evals(runs / "straight")
    steps = [r["step"] for r in records(killed, "StepMetrics")]
    assert steps == [r["step"] for r in records(runs / "straight", "StepMetrics")]
    assert (killed / "samples.txt").read_text() == (runs / "straight" / "samples.txt").read_text()
    # The newest --keep-checkpoints 3 and best, and nothing left over from the crashes.
    n = 40 * trials
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == [
        "best",
        f"step-{n - 10:08d}",
        f"step-{n - 5:08d}",
        f"step-{n:08d}",
    ]
    print(
        f"\nkill -9 trials: {trials} ({mid_write_kills} aimed at a checkpoint write, {really_mid_write} of them "
        f"left its .tmp- folder behind), corrupt checkpoints found: {corrupt_found}, final weights equal to "
        "the uninterrupted run's"
    )


# -- stop signals, headless (the dashboard's are in test_tmux.py) ------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_saves_prints_the_resume_command_and_exits_128_plus_n(sig, tmp_path, shared_dir):
    runs = tmp_path / "runs"
    proc = start_moe_tui(
        ["train", "simpsons", *as_flags(TINY), "--max-iters", "100000", "--run-name", "sig", "--headless"], runs
    )
    for line in proc.stdout:  # wait until it is really training
        if line.startswith("step "):
            break
    sent = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    seconds = time.monotonic() - sent
    assert proc.returncode == 128 + sig, err
    assert "resume with: moe-tui train --resume sig" in err and "Traceback" not in err
    stopped_at = max(r["step"] for r in records(runs / "sig", "StepMetrics"))
    newest, _ = intact_or_count_corrupt(runs / "sig")
    assert newest >= stopped_at  # the steps since the last log line are saved too
    print(f"\n{sig.name}: exited {proc.returncode} {seconds:.2f}s after the signal, saved step {newest}")
    assert seconds < 10, "docs/runs.md says within about 1 s of the signal (on this test model)"
    if sig == signal.SIGINT:  # and it resumes from there (in this process: the resume is not what is tested)
        resumed = moe_tui_here(runs, "resumed", "train", "--resume", "sig", "--max-iters", str(newest + 10))
        assert f"resuming at step {newest}" in resumed


# A stop signal's handler queues the stop on the main thread, which may be inside the loop's own `next()`
# at that instant. Here a timer signals every millisecond while the loop reads its commands: a queue
# whose lock the interrupted read holds would hang (or recurse) on the first signal that lands there.
SIGNALLED_WHILE_READING = """
import signal, sys
from moe_core.train.control import Control
control, handled, taken = Control(), 0, 0
def on_signal(signum, frame):
    global handled
    handled += 1
    control.stop("alarm")
signal.signal(signal.SIGALRM, on_signal)
signal.setitimer(signal.ITIMER_REAL, 1e-3, 1e-3)
while handled < 300:
    taken += control.next(None) is not None
signal.setitimer(signal.ITIMER_REAL, 0)
while control.next(None) is not None:
    taken += 1
print(handled, taken)
"""


def test_a_stop_signalled_while_the_loop_reads_its_commands_is_queued_not_a_hang():
    done = subprocess.run(
        [sys.executable, "-c", SIGNALLED_WHILE_READING], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-2000:]
    handled, taken = map(int, done.stdout.split())
    assert handled == taken >= 300  # every stop queued, once, none lost (a last tick may add one)


# -- a disk that refuses checkpoint writes ---------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES], ids=errno.errorcode.get)
def test_a_failing_save_warns_keeps_the_previous_checkpoint_and_training_goes_on(
    code, tmp_path, shared_dir, monkeypatch, capsys
):
    real_save = safetensors.torch.save_file
    kept = {}

    def save_file_on_a_full_disk(tensors, path):
        if "step-00000010" in str(path) or "best" in str(path):
            real_save(tensors, path)
            kept["step-00000010" if "step-00000010" in str(path) else "best"] = Path(path).read_bytes()
            return
        Path(path).write_bytes(b"\0" * 1000)  # the disk fills part way through the file
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(safetensors.torch, "save_file", save_file_on_a_full_disk)
    runs = tmp_path / "runs"
    args = [
        "train",
        "simpsons",
        *as_flags(TINY),
        "--max-iters",
        "30",
        "--ckpt-interval",
        "10",
        "--eval-interval",
        "10",
        "--run-name",
        "full",
        "--headless",
        "--data-dir",
        str(shared_dir),
        "--runs-dir",
        str(runs),
    ]
    code_ = main(args)
    out, err = capsys.readouterr()
    assert code_ == 1, "finishing without saving the last steps is not a success"
    assert f"warning: could not save a checkpoint at step 20 ([Errno {code}]" in out
    assert "training goes on and the previous checkpoint is kept" in out
    assert "step     30" in out, "training stopped after the failed save"
    assert "the last checkpoint is step 10" in err and "moe-tui train --resume full" in err
    root = runs / "full" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["best", "step-00000010"]  # no half-written folders
    assert (root / "step-00000010" / MODEL_FILE).read_bytes() == kept["step-00000010"]
    load_checkpoint(root / "step-00000010")

    monkeypatch.setattr(safetensors.torch, "save_file", real_save)  # space freed: resume works
    assert (
        main(["train", "--resume", "full", "--headless", "--data-dir", str(shared_dir), "--runs-dir", str(runs)]) == 0
    )
    assert "resuming at step 10" in capsys.readouterr().out


def test_a_real_file_size_limit_fails_every_save_and_training_still_finishes(tmp_path, shared_dir):
    def limit_file_size():  # the kernel refuses writes past 256 KiB: EFBIG, with SIGXFSZ ignored
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    runs = tmp_path / "runs"
    proc = start_moe_tui(
        [
            "train",
            "simpsons",
            *as_flags(TINY),
            "--max-iters",
            "20",
            "--ckpt-interval",
            "10",
            "--eval-interval",
            "10",
            "--run-name",
            "limited",
            "--headless",
        ],
        runs,
        preexec_fn=limit_file_size,
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert "could not save a checkpoint at step 10" in out and "File too large" in out
    assert "step     20" in out and "Traceback" not in out + err
    assert not any((runs / "limited" / "checkpoints").iterdir()), "a failed save left files behind"


def test_a_best_checkpoint_that_could_not_be_written_is_not_counted_as_best(tmp_path, shared_dir, monkeypatch):
    real_save = checkpoint_writer.save_checkpoint

    def no_room_for_best(folder, *args):
        if folder.name == "best":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(folder, *args)

    monkeypatch.setattr(checkpoint_writer, "save_checkpoint", no_room_for_best)
    trainer = make_trainer(tmp_path, shared_dir, max_iters=10, eval_interval=1000, ckpt_interval=1000)
    assert trainer.run() == "finished"  # its final evaluation was the best so far, but not written
    _, state, _ = load_checkpoint(trainer.run_folder.checkpoints / "step-00000010")
    assert state["best_val"] == float("inf")  # so the next evaluation after a resume writes `best`

    monkeypatch.setattr(checkpoint_writer, "save_checkpoint", real_save)
    resumed = make_trainer(tmp_path, shared_dir, resume=True, max_iters=20, eval_interval=1000, ckpt_interval=1000)
    assert resumed.run() == "finished"
    assert load_checkpoint(resumed.run_folder.checkpoints / "best")[2]["step"] == 20


def test_the_checkpoint_writer_lets_one_snapshot_wait_and_then_holds_training_back(tmp_path):
    disk = threading.Event()  # a disk that takes as long as the test says

    class SlowSnapshot(checkpoint_writer.Snapshot):
        def write(self):
            disk.wait(timeout=30)
            return self.folder

    writer = checkpoint_writer.CheckpointWriter()
    snapshots = [SlowSnapshot(tmp_path / f"step-{i}", {}, {}, {}, i, False, 3) for i in range(3)]
    writer.submit(snapshots[0])
    time.sleep(0.2)  # the writer thread takes it and blocks on the disk
    writer.submit(snapshots[1])  # one may wait in memory
    third = threading.Thread(target=writer.submit, args=(snapshots[2],))
    third.start()
    third.join(timeout=0.5)
    assert third.is_alive(), "a third snapshot was queued in memory while the disk was busy"
    disk.set()
    third.join(timeout=30)
    assert [snap.step for snap, error in writer.outcomes(wait=True)] == [0, 1, 2]


# -- what a crash leaves behind --------------------------------------------------------------------


def test_resume_repairs_everything_a_crash_can_leave_in_a_run_folder(tmp_path, shared_dir):
    trainer = make_trainer(tmp_path, shared_dir, max_iters=30, ckpt_interval=10, eval_interval=10, sample_interval=10)
    trainer.run()
    run = trainer.run_folder
    root = run.checkpoints
    # The process died while logging step 40 (a torn last line) after logging steps past the
    # checkpoint, and while replacing `best` (only the set-aside copy is left) ...
    lines = run.metrics_path.read_text().splitlines()
    phantom = [json.dumps({**json.loads(line), "step": 35}) for line in lines if '"StepMetrics"' in line][:1]
    run.metrics_path.write_text("\n".join(lines + phantom) + '\n{"event": "StepMetrics", "st')
    run.append_sample(35, "a sample from a step that no checkpoint holds")
    os.replace(root / "best", root / ".old-best-4242")
    # ... and a newer checkpoint folder was damaged after the fact, with a half-written one beside it.
    (root / "step-00000040").mkdir()
    (root / "step-00000040" / MODEL_FILE).write_bytes(b"\0" * 100)
    (root / ".tmp-step-00000050-4242").mkdir()
    (root / ".del-step-00000000-4242").mkdir()  # an old checkpoint, half deleted

    events = []
    resumed = make_trainer(
        tmp_path,
        shared_dir,
        resume=True,
        sink=events.append,
        max_iters=50,
        ckpt_interval=10,
        eval_interval=10,
        sample_interval=10,
    )
    assert resumed.step_num == 30
    assert resumed.run() == "finished"
    notes = [e.message for e in events if isinstance(e, Notice)]
    assert any("restored checkpoint best" in m for m in notes)
    assert any("skipped: checkpoint" in m and "step-00000040" in m and "incomplete" in m for m in notes)
    assert any("dropped 2 metrics line(s) logged after step 30" in m for m in notes)
    steps = [r["step"] for r in run.read_metrics() if r["event"] == "StepMetrics"]
    assert steps == [10, 20, 30, 40, 50]
    assert "step 35" not in run.samples_path.read_text()
    assert not (root / ".old-best-4242").exists() and not list(root.glob(".tmp-*")) and not list(root.glob(".del-*"))
    load_checkpoint(root / "best")


def test_a_crash_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, shared_dir, monkeypatch):
    trainer = make_trainer(tmp_path, shared_dir, max_iters=30, ckpt_interval=10, eval_interval=10, keep_checkpoints=3)
    trainer.run()
    root = trainer.run_folder.checkpoints

    def die_halfway(path, ignore_errors=False):  # the process is killed after deleting one file
        os.remove(sorted(Path(path).iterdir())[0])
        raise SystemExit("killed")

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", die_halfway)
    with pytest.raises(SystemExit):
        checkpoint_module.prune(root, keep=1)
    for _, folder in step_checkpoints(root):
        load_checkpoint(folder)  # whole, or not there at all
    assert [step for step, _ in step_checkpoints(root)] == [30, 10]  # 20 went first, all at once
    monkeypatch.undo()
    checkpoint_module.prune(root, keep=1)  # the next prune clears what the crash left
    assert sorted(p.name for p in root.iterdir()) == ["best", "step-00000030"]


def test_resuming_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, shared_dir):
    make_trainer(tmp_path, shared_dir)  # the run folder exists, no step was saved
    events = []
    trainer = make_trainer(tmp_path, shared_dir, resume=True, sink=events.append, max_iters=10)
    assert trainer.step_num == 0 and trainer.run() == "finished"
    assert any(isinstance(e, Notice) and "before its first checkpoint" in e.message for e in events)


def test_a_run_whose_checkpoints_are_all_corrupt_is_refused(tmp_path, shared_dir):
    make_trainer(tmp_path, shared_dir, max_iters=10, ckpt_interval=10).run()
    model = tmp_path / "run" / "checkpoints" / "step-00000010" / MODEL_FILE
    model.write_bytes(model.read_bytes()[:-1])
    with pytest.raises(UserError, match="no intact checkpoint .*does not match its manifest.*--overwrite"):
        make_trainer(tmp_path, shared_dir, resume=True)


def test_a_failing_metrics_log_warns_once_and_training_goes_on(tmp_path, shared_dir, monkeypatch):
    events = []
    trainer = make_trainer(tmp_path, shared_dir, sink=events.append, max_iters=30, ckpt_interval=10)

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):  # the disk fills at step 15
        if Path(path).name == "metrics.jsonl" and "a" in mode and trainer.step_num >= 15:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(runs_module, "open", open_on_a_full_disk, raising=False)  # what Run.log opens
    assert trainer.run() == "finished"
    warnings = [e for e in events if isinstance(e, Notice) and "cannot write metrics.jsonl" in e.message]
    assert len(warnings) == 1 and trainer.step_num == 30
