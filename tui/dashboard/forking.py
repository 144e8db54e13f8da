"""The dashboard's `f` key: start a fork of the run in focus as a detached `moe-tui train --fork`, off the
UI thread, and say what it said (how to watch it, or why it did not start)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Callable

from moe_core.store.runs import Run

SAVE_SECONDS = 30.0  # the checkpoint asked for just before the dialog, on a slow disk


def start_fork(parent: Run, step: int, changes: dict, name: str, said: Callable[[str], None]) -> None:
    """`moe-tui train --fork PARENT@STEP --run-name NAME [--KEY VALUE ...] --detach`, once that step's
    checkpoint is on disk; `said` gets its output."""
    flags = [arg for key, value in changes.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    argv = [sys.executable, "-m", "tui", "train", "--fork", f"{parent.name}@{step}", "--run-name", name, *flags,
            "--detach", "--runs-dir", str(parent.path.parent)]  # fmt: skip

    def run() -> None:
        checkpoint = parent.checkpoints / f"step-{step:08d}"
        deadline = time.monotonic() + SAVE_SECONDS
        while not (checkpoint / "manifest.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        said((done.stdout + done.stderr).strip() or f"moe-tui exited with {done.returncode}")

    threading.Thread(target=run, name="fork", daemon=True).start()
