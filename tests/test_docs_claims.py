"""Claims of the docs that no other test checked, each on the real program: how a run stops and fails
(docs/runs.md, "Nothing lost"), what a run folder and a checkpoint hold (docs/runs.md, "Runs and
checkpoints"), and NO_COLOR (docs/watching.md)."""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import signal
import subprocess
import time
from datetime import datetime

import pytest
import torch

from moe_core.config import RESUMABLE_KEYS
from moe_core.events import CheckpointSaved, Notice
from moe_core.store.checkpoint import MANIFEST_FILE, file_digest, load_checkpoint
from moe_core.store.runs import Run
from tests.conftest import TINY, TINY_FLAGS, as_flags, cli, start_moe_tui, tree
from tests.test_faults import records
from tests.test_tmux import MOE_TUI, TMUX, Terminal, train_command
from tests.test_training import make_trainer

# -- Nothing lost ---------------------------------------------------------------------------------


def sampling_every_step(name: str, tokens: int, runs) -> tuple[subprocess.Popen, str]:
    """A headless run that logs and samples `tokens` characters after every step, returned once its
    first step is logged (its first sample has begun), with what it has printed so far."""
    proc = start_moe_tui(
        [
            "train",
            "simpsons",
            *as_flags(TINY),
            *("--max-iters", "1000", "--log-interval", "1", "--sample-interval", "1"),
            *("--sample-tokens", str(tokens), "--run-name", name, "--headless"),
        ],
        runs,
    )
    said = ""
    for line in proc.stdout:
        said += line
        if line.startswith("step "):
            return proc, said
    raise AssertionError(proc.stderr.read())


def signal_handled(pid: int, sig: int) -> None:
    """Wait until `pid` has taken `sig` and its main thread has run on for 30 ms of CPU time since: in a
    loop of small steps, long enough to call its Python handler. (A second signal sent before that call
    would be folded into the first.)"""
    bit = 1 << (sig - 1)

    def pending() -> bool:
        threads = os.listdir(f"/proc/{pid}/task")
        lines = [line for t in threads for line in open(f"/proc/{pid}/task/{t}/status") if line[3:6] == "Pnd"]
        return any(int(line.split()[1], 16) & bit for line in lines)

    def main_thread_ticks() -> int:
        fields = open(f"/proc/{pid}/task/{pid}/stat").read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks

    deadline = time.monotonic() + 60
    while pending():
        assert time.monotonic() < deadline, "the signal was never taken"
        time.sleep(0.01)
    ticks = main_thread_ticks() + math.ceil(0.03 * os.sysconf("SC_CLK_TCK"))
    while main_thread_ticks() < ticks:
        assert time.monotonic() < deadline, "the process stopped running"
        time.sleep(0.01)


def test_one_ctrl_c_waits_for_the_step_and_a_second_quits_at_once(tmp_path):
    # One Ctrl-C lets the step end (most of which is the sample after it, 1,000 characters), then saves.
    runs = tmp_path / "runs"
    proc, said = sampling_every_step("once", 1000, runs)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    out = said + out
    assert proc.returncode == 130 and "Traceback" not in err, err
    last = int(re.findall(r"^step +(\d+)", out, re.M)[-1])
    assert f"sample @ step {last}:" in out
    assert [p.name for p in (runs / "once" / "checkpoints").glob("step-*")] == [f"step-{last:08d}"]
    assert "resume with: moe-tui train --resume once" in err

    # A second quits without waiting for either: a sample of 100,000 characters is cut short, nothing saved.
    proc, _ = sampling_every_step("twice", 100_000, runs)
    proc.send_signal(signal.SIGINT)
    signal_handled(proc.pid, signal.SIGINT)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "resume with" not in err and "sample @" not in out  # neither the sample nor the save finished
    assert not any((runs / "twice" / "checkpoints").glob("step-*"))


def test_headless_nan_exits_1_and_keeps_the_last_good_checkpoint(trained, capsys):
    before = tree(trained / "checkpoints")
    # A learning rate of 1e10 makes the weights overflow within a step or two: a real divergence.
    code, out, err = cli(capsys, "train", "--resume", "tiny", "--lr", "1e10", "--max-iters", "60", "--headless")
    assert code == 1
    failed = re.search(
        r"error: loss or gradient norm became non-finite at step (\d+)\. Training stopped; "
        r"the last good checkpoint \(step 30\) is kept; resume with a lower --lr",
        out,
    )
    assert failed and 30 < int(failed[1]) < 40, out
    assert "resume from the last good checkpoint with: moe-tui train --resume tiny" in err
    assert tree(trained / "checkpoints") == before  # nothing saved after the failure
    weights, state, _ = load_checkpoint(trained / "checkpoints" / "step-00000030")
    assert state["step"] == 30 and all(torch.isfinite(w).all() for w in weights.values())


def fail_after_step_20(trainer, poison) -> tuple[list, dict[int, list[float]]]:
    """Train, `poison()` the trainer once step 20's checkpoint is taken, and return the events and each step's
    (loss, aux loss, z loss, gradient norm) as the trainer recorded them."""
    events, rows = [], {}
    step = trainer.step

    def step_and_record():
        step()
        rows[trainer.step_num] = [float(v) for v in trainer.window.rows[-1]]

    take_snapshot = trainer.snapshot

    def snapshot_then_poison(best, saved, rank_rng=None):  # the checkpoint's copy is taken; the file is written later
        snapshot = take_snapshot(best, saved, rank_rng)
        if trainer.step_num == 20 and not best:
            with torch.no_grad():
                poison()
        return snapshot

    trainer.step, trainer.snapshot, trainer.on_event = step_and_record, snapshot_then_poison, events.append
    assert trainer.run() == "error"
    return events, rows


def assert_stopped_at_step_21_keeping_step_20(trainer, events) -> None:
    errors = [e.message for e in events if isinstance(e, Notice) and e.level == "error"]
    assert errors and errors[0].startswith(
        "loss or gradient norm became non-finite at step 21. Training "
        "stopped; the last good checkpoint (step 20) is kept"
    ), errors
    assert [e.step for e in events if isinstance(e, CheckpointSaved) and not e.best] == [20]
    assert trainer.run_folder.checkpoint("latest").name == "step-00000020"


def test_an_inf_loss_stops_training(tmp_path, shared_dir):
    trainer = make_trainer(
        tmp_path, shared_dir, max_iters=100, ckpt_interval=20, eval_interval=1000, sample_interval=1000
    )
    space = trainer.vocab.encode(" ")[0]  # from step 21 the model gives the space no chance at all

    def never_a_space():
        trainer.model.lm_head.bias[space] = -math.inf

    events, rows = fail_after_step_20(trainer, never_a_space)
    assert rows[21][0] == math.inf  # the loss is inf, not NaN
    assert_stopped_at_step_21_keeping_step_20(trainer, events)


def test_a_non_finite_gradient_norm_stops_training_even_with_a_finite_loss(tmp_path, shared_dir):
    trainer = make_trainer(
        tmp_path, shared_dir, max_iters=100, ckpt_interval=20, eval_interval=1000, sample_interval=1000
    )

    def overflow_in_backward():  # from step 21 one gradient overflows float32, as a too-large one would
        trainer.model.lm_head.weight.register_hook(lambda grad: grad * 1e38 * 1e38)

    events, rows = fail_after_step_20(trainer, overflow_in_backward)
    loss, _, _, grad_norm = rows[21]
    assert math.isfinite(loss) and not math.isfinite(grad_norm)
    assert_stopped_at_step_21_keeping_step_20(trainer, events)


def without_permission_override() -> None:
    """Let the kernel's permission checks apply to this process (run before exec): for root, drop
    the capabilities that bypass them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from the bounding
    set, which limits what the program exec'd gets. Other users are bound by them already."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_a_checkpoint_folder_that_is_really_not_writable(trained):
    # chmod, not a patched function. Run as root, the tests would bypass it: the process runs without the
    # capabilities that override file permissions (rather than as another user, who might not be allowed
    # to run this Python at all), so that to the kernel it is an ordinary user's.
    root = trained / "checkpoints"
    before = tree(root)
    root.chmod(0o555)
    try:
        proc = start_moe_tui(
            ["train", "--resume", "tiny", "--max-iters", "50", "--headless"],
            trained.parent,
            preexec_fn=without_permission_override,
        )
        out, err = proc.communicate(timeout=300)
    finally:
        root.chmod(0o755)
    assert proc.returncode == 1, err
    for step in (40, 50):
        assert f"warning: could not save a checkpoint at step {step} ([Errno 13] Permission denied" in out, out
    assert "training goes on and the previous checkpoint is kept" in out and "step     50" in out
    assert "the last checkpoint is step 30" in err and "Traceback" not in out + err
    assert tree(root) == before


# -- Runs and checkpoints -------------------------------------------------------------------------


def test_default_run_name_and_three_checkpoints_kept(env, capsys):
    started = time.time()
    code, out, err = cli(
        capsys, "train", "simpsons", *TINY_FLAGS, "--max-iters", "30", "--ckpt-interval", "5", "--headless"
    )
    assert code == 0, err
    (run,) = env.iterdir()
    stamp = re.fullmatch(r"simpsons-(\d{8}-\d{6})", run.name)  # <dataset>-<YYYYmmdd-HHMMSS>
    assert stamp and f"training run '{run.name}'" in out
    assert int(started) <= datetime.strptime(stamp[1], "%Y%m%d-%H%M%S").timestamp() <= time.time()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "best",
        "step-00000020",
        "step-00000025",
        "step-00000030",
    ]  # --keep-checkpoints 3 by default


def test_the_manifest_holds_the_shape_its_hash_and_the_resumable_settings(trained):
    config = Run(trained).load_config()
    folders = [trained / "checkpoints" / name for name in ("step-00000010", "step-00000030", "best")]
    manifests = [json.loads((folder / MANIFEST_FILE).read_text()) for folder in folders]
    manifest = manifests[1]
    assert manifest["step"] == 30
    assert manifest["shape"] == {
        "n_layer": 2,
        "n_head": 4,
        "n_embd": 64,
        "block_size": 32,
        "num_experts": 4,
        "top_k": 2,
        "router": "topk",
        "dataset": "simpsons",
        "columns": [],
        "encoding": "utf-8",
        "val_fraction": 0.1,
    }
    # Its hash (sha256): the same in every checkpoint of the run. A resume that changes only resumable
    # settings keeps it (below); another shape has another (the dense run of tests/test_cli_coverage.py).
    (shape_hash,) = {m["config_hash"] for m in manifests}
    assert re.fullmatch(r"[0-9a-f]{64}", shape_hash)
    # The settings a resume may change, as the run had them (TINY, the cpu preset's defaults).
    assert manifest["config"] == {
        "aux_loss_coef": 0.01,
        "capacity_factor": 0.0,
        "dropout": 0.0,
        "guard": True,
        "guard_dead_share": 0.1,
        "guard_entropy": 0.3,
        "guard_slow": 2.0,
        "guard_spike": 3.0,
        "guard_val_rises": 3,
        "guard_windows": 5,
        "on_alert": "",
        "router_noise": 1.0,
        "warmup_iters": 20,
        "weight_decay": 0.1,
        "z_loss_coef": 0.001,
        "ckpt_interval": 10,
        "compile": False,
        "device": "cpu",
        "eval_interval": 10,
        "eval_iters": 5,
        "grad_clip": 1.0,
        "keep_checkpoints": 3,
        "log_interval": 10,
        "lr": 0.003,
        "max_iters": 30,
        "min_lr_ratio": 0.1,
        "preset": "cpu",
        "sample_interval": 100,
        "sample_tokens": 40,
        "track": [],
        "track_project": "moe-tui",
    }
    assert manifest["config"] == {key: getattr(config, key) for key in RESUMABLE_KEYS}  # and config.toml's
    for name, entry in manifest["files"].items():
        assert entry == {"size": (folders[1] / name).stat().st_size, "sha256": file_digest(folders[1] / name)}


def test_resume_may_change_device_compile_and_intervals(trained, capsys, monkeypatch):
    code, out, err = cli(
        capsys,
        "train",
        "--resume",
        "tiny",
        "--max-iters",
        "40",
        "--device",
        "auto",
        "--log-interval",
        "5",
        "--eval-interval",
        "5",
        "--ckpt-interval",
        "5",
        "--sample-interval",
        "5",
        "--headless",
    )
    assert code == 0, err
    changed = (
        "resumed from step-00000030 with changed settings: ckpt_interval 10 -> 5, device cpu -> auto, "
        "eval_interval 10 -> 5, log_interval 10 -> 5, max_iters 30 -> 40, sample_interval 100 -> 5"
    )
    assert f"info: {changed}" in out
    assert changed in (trained / "metrics.jsonl").read_text()
    saved = Run(trained).load_config()
    assert (saved.device, saved.ckpt_interval, saved.max_iters) == ("auto", 5, 40)
    # And they apply: a log line, an evaluation, a sample and a checkpoint every 5 steps.
    assert [r["step"] for r in records(trained, "StepMetrics")][-2:] == [35, 40]
    assert [r["step"] for r in records(trained, "EvalMetrics")][-2:] == [35, 40]
    assert "--- step 35" in (trained / "samples.txt").read_text()
    assert (trained / "checkpoints" / "step-00000035").is_dir()
    hashes = [
        json.loads((trained / "checkpoints" / name / MANIFEST_FILE).read_text())["config_hash"]
        for name in ("step-00000030", "step-00000035")
    ]
    assert hashes[0] == hashes[1]  # the same shape, whatever else changed

    # --compile, with torch.compile's eager backend: Dynamo captures the model as it does for --compile,
    # without the minute Inductor's code generation takes on 2 cores. One step: each step recompiles
    # while the experts' token counts keep changing, which costs seconds.
    compiled = []
    compile_ = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda model, **kw: compiled.append(model) or compile_(model, backend="eager")
    )
    try:
        code, out, err = cli(capsys, "train", "--resume", "tiny", "--max-iters", "41", "--compile", "--headless")
    finally:
        torch._dynamo.reset()
    assert code == 0, err
    assert "with changed settings: compile False -> True, max_iters 40 -> 41" in out and "step     41" in out
    assert [type(model).__name__ for model in compiled] == ["MoETransformer"]
    assert Run(trained).load_config().compile is True


# -- The dashboard in a real terminal --------------------------------------------------------------


def hued_colours(screen: str) -> set[str]:
    """The colours with a hue (not black, grey or white) set by the screen's escape codes."""

    def grey(n: int) -> bool:  # the 256-colour palette: 16 system colours, a 6x6x6 cube, 24 greys
        if n < 16:
            return n in (0, 7, 8, 15)
        return n >= 232 or (n - 16) // 36 == (n - 16) // 6 % 6 == (n - 16) % 6

    found = set()
    for codes in re.findall(r"\x1b\[([\d;]*)m", screen):
        numbers = [int(c) for c in codes.split(";") if c]
        while numbers:
            n = numbers.pop(0)
            if n in (38, 48) and numbers[:1] == [5]:
                colour = numbers[1]
                numbers = numbers[2:]
                if not grey(colour):
                    found.add(f"{n};5;{colour}")
            elif n in (38, 48) and numbers[:1] == [2]:
                rgb = numbers[1:4]
                numbers = numbers[4:]
                if len(set(rgb)) > 1:
                    found.add(f"{n};2;{';'.join(map(str, rgb))}")
            elif 31 <= n <= 36 or 41 <= n <= 46 or 91 <= n <= 96 or 101 <= n <= 106:
                found.add(str(n))
    return found


@pytest.mark.skipif(TMUX is None or not MOE_TUI.is_file(), reason="needs tmux and the moe-tui console script")
def test_no_color_is_honoured(tmp_path, shared_dir):
    # The same dashboard twice, side by side: with NO_COLOR, and without it, to show the check sees colour.
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TMUX")}
    terminals = {"plain": Terminal(tmp_path / "plain"), "colour": Terminal(tmp_path / "colour")}
    screens = {}
    try:
        for name, terminal in terminals.items():
            no_color = {"NO_COLOR": "1"} if name == "plain" else {}
            terminal.start(
                f"{train_command()}; sleep 600",
                {**env, **no_color, "MOE_TUI_DATA": str(shared_dir), "MOE_TUI_RUNS": str(tmp_path / name)},
            )
        for name, terminal in terminals.items():
            terminal.wait_for(r"RUNNING +step [1-9]\d*/100000")
            screens[name] = terminal.tmux("capture-pane", "-p", "-e", "-t", "main")  # with its colours
    finally:
        for terminal in terminals.values():
            terminal.close()
    assert hued_colours(screens["colour"]), "the check finds no colour even without NO_COLOR"
    assert not hued_colours(screens["plain"]), screens["plain"]
    assert "RUNNING" in screens["plain"] and "\x1b[" in screens["plain"]  # greys and bold remain


def test_a_run_that_fails_before_its_first_checkpoint_says_it_starts_again(tmp_path, shared_dir):
    import io

    from tui.exits import print_next_step

    trainer = make_trainer(
        tmp_path, shared_dir, max_iters=100, ckpt_interval=1000, eval_interval=1000, sample_interval=1000
    )
    with torch.no_grad():  # diverged from the start: there is no good checkpoint to go back to
        trainer.model.lm_head.weight[0, 0] = float("nan")
    assert trainer.run() == "error" and trainer.last_saved_step == -1
    said = io.StringIO()
    print_next_step(trainer, "moe-tui train --resume run", "moe-tui sample run", said)
    assert said.getvalue() == (
        "no checkpoint was saved before the failure; start again from step 0 with: "
        "moe-tui train --resume run --lr <lower>\n"
    )
