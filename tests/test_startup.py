"""Commands that neither train nor sample start without torch (seconds of imports saved each): each runs in
a process of its own, here under `python -X importtime`, which lists every module the process imported;
the viewer in a real terminal, whose memory map shows whether libtorch was loaded."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_core.live.lease import read_status
from moe_core.store.runs import Run
from tests.conftest import QUIET_FLAGS, REPO, TINY_FLAGS, shared_data_dir
from tests.test_tmux import MOE_TUI, TMUX, Terminal


def moe_tui(runs: Path, *args: str) -> tuple[int, str, str, set[str]]:
    """(exit code, stdout, stderr without the import lines, every module imported) of `moe-tui ARGS`."""
    env = {**os.environ, "MOE_TUI_DATA": str(shared_data_dir()), "MOE_TUI_RUNS": str(runs), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tui", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    imports = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    modules = {line.rsplit("|", 1)[1].strip() for line in imports[1:]}  # the first line is the header
    err = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("import time:"))
    return proc.returncode, proc.stdout, err, modules


def test_importing_the_command_line_does_not_import_torch():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, tui.cli; print(sorted(m for m in sys.modules if m.startswith('torch')))"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "args, answer",
    [
        (["--help"], r"train\s.*\n(.*\n)*.*\bwatch\s"),  # the commands, listed
        (["runs"], r"tiny .* finished .* simpsons .* 30/30"),
        (["runs", "show", "tiny"], r"tiny .*\(finished\)"),
        (["datasets"], r"shakespeare .*\n(.*\n)*.*simpsons"),
        (["stop", "tiny"], r"run 'tiny' is not running \(finished at step 30\)"),
        (["set", "tiny", "lr=0.001"], r"run 'tiny' is not training \(finished\)"),
        (["watch", "tiny"], r"moe-tui watch draws a dashboard and needs a terminal"),  # up to its terminal check
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_commands_that_neither_train_nor_sample_do_not_import_torch(trained_once, args, answer):
    code, out, err, modules = moe_tui(trained_once.parent, *args)
    assert re.search(answer, out + err), out + err
    assert code == (2 if args[0] in ("set", "watch") else 0), err
    assert "moe_core" in modules  # the listing is read right: the engine is imported, torch is not
    assert not {m for m in modules if m == "torch" or m.startswith("torch.")}


def test_a_detached_start_leaves_torch_to_the_trainer_it_starts(tmp_path):
    """`train --detach` returns as soon as its child trains: the child checks and trains, the command
    that starts it need not wait for torch's imports as well."""
    runs = tmp_path / "runs"
    code, out, err, modules = moe_tui(
        runs, "train", "simpsons", *TINY_FLAGS, *QUIET_FLAGS, "--run-name", "bg", "--detach"
    )
    try:
        assert code == 0, err
        assert re.search(r"training run 'bg' in the background as process \d+", out), out
        assert "moe_core" in modules and not {m for m in modules if m == "torch" or m.startswith("torch.")}
    finally:
        stopped = moe_tui(runs, "stop", "bg")
        status = read_status(Run(runs / "bg"))
        if status.state == "live":  # `stop` failed: no trainer may outlive the test
            os.kill(status.pid, signal.SIGKILL)
    assert stopped[0] == 0 and "stopped run 'bg' at step" in stopped[1], stopped


def test_sampling_imports_torch_where_it_needs_it(trained_once):
    """The same listing shows torch where it is needed: it would show an import that crept back in."""
    code, out, err, modules = moe_tui(trained_once.parent, "sample", "tiny", "--max-new-tokens", "5", "--prompt", "B")
    assert code == 0, err
    assert out.startswith("B") and len(out.rstrip("\n")) >= 2
    assert "torch" in modules and "moe_core.model.sampling" in modules


def test_training_leaves_torchs_compiler_unimported(tmp_path):
    """Steps, an evaluation, a sample and checkpoints without `torch._dynamo` (1.3 s of imports, which
    `torch.optim.AdamW` would bring: moe_core/optim.py); only --compile needs it."""
    every_5 = ["--eval-interval", "5", "--sample-interval", "5", "--ckpt-interval", "5", "--max-iters", "10"]
    code, out, err, modules = moe_tui(tmp_path, "train", "simpsons", *TINY_FLAGS, *every_5, "--headless")
    assert code == 0, err
    assert "sample @ step 10" in out and re.search(r"saved checkpoint at step 10 ", out), out
    assert "torch" in modules and "moe_core.optim" in modules
    assert not {m for m in modules if m.startswith("torch._dynamo")}


def torch_loaded(pid: int) -> bool:
    """Whether the process has torch's library mapped: imported torch, at some point."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(TMUX is None or not MOE_TUI.is_file(), reason="needs tmux and the moe-tui console script")
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory map from /proc")
def test_a_viewer_draws_without_torch_and_loads_it_to_sample_a_finished_run(trained_once, tmp_path):
    terminal = Terminal(tmp_path)
    env = {**os.environ, "MOE_TUI_DATA": str(shared_data_dir()), "MOE_TUI_RUNS": str(trained_once.parent)}
    try:
        terminal.start(f"exec {shlex.quote(str(MOE_TUI))} watch tiny", env)
        terminal.wait_for(r"finished")
        terminal.wait_for(r"30/30")  # the run's whole history is drawn
        pid = int(terminal.tmux("display", "-p", "-t", "main", "#{pane_pid}"))
        assert not torch_loaded(pid)

        terminal.send("s")  # no live trainer: the viewer samples the checkpoint itself
        terminal.wait_for(r"prompt\s+\\n\s")  # the dialog, its prompt field in focus
        terminal.send("C-u")  # emptied; keys sent before it is would be lost
        deadline = time.monotonic() + 60
        while re.search(r"prompt\s+\\n\s", terminal.screen()):
            assert time.monotonic() < deadline, f"the prompt field was not emptied:\n{terminal.screen()}"
            time.sleep(0.1)
        terminal.send("-l", "Bart:")
        terminal.wait_for(r"prompt\s+Bart:")
        terminal.send("Enter")
        deadline = time.monotonic() + 120
        while not torch_loaded(pid):
            assert time.monotonic() < deadline, f"torch never loaded to sample:\n{terminal.screen()}"
            time.sleep(0.1)
        deadline = time.monotonic() + 120
        while "Sample from the model now" in (screen := terminal.wait_for(r"Bart:")):  # the dialog's own field
            assert time.monotonic() < deadline, f"the dialog never closed:\n{screen}"
            time.sleep(0.1)
    finally:
        terminal.close()
