"""`moe-tui train --detach`: training as a background process that outlives the terminal.

The command starts itself again as a child in a session of its own, with this flag's work marked in
its environment. The child checks everything and builds its trainer with its stdout and stderr on
pipes to the parent, so a mistake is reported here, as one line with exit code 2, exactly as without
--detach. Once training is about to start, the child moves its output to the run's `train.log`; the
pipes close, and the parent prints how to watch and stop the run, and returns.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from moe_core.live.lease import read_status
from moe_core.store.runs import Run
from tui.exits import redirect_output

CHILD_ENV = "MOE_TUI_DETACHED"
BACKGROUND = "in the background as process"  # the child's word that it is up and training


def is_detached_child() -> bool:
    return os.environ.get(CHILD_ENV) == "1"


def start_detached(argv: list[str]) -> int:
    """Start `moe-tui ARGV` again as a child that trains in the background; the exit code for this one."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tui", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, CHILD_ENV: "1"},
    )
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.append(child.stderr.read()), daemon=True)
    reader.start()
    try:
        said = child.stdout.read()  # to EOF: the child has moved its output to train.log, or exited
        reader.join()
    except BaseException:  # Ctrl-C while the child prepares: it must not train on unseen, or half-start
        child.terminate()
        child.wait()
        raise
    sys.stdout.write(said)
    sys.stderr.write("".join(errors))
    return 0 if BACKGROUND in said else child.wait()


def output_to_log_once_live(run: Run) -> None:
    """With several processes (`--nproc N --detach`), for the detached launcher and the ranks other than
    0: they hold the parent's pipes too, so once rank 0 trains (and has moved its own output), they move
    theirs to train.log, and the parent's read ends. Until then a mistake still reaches the terminal."""

    def when_live() -> None:
        while read_status(run).state != "live":
            time.sleep(0.1)
        redirect_output(run.path / "train.log")

    threading.Thread(target=when_live, name="output-to-log", daemon=True).start()


def move_output_to_log(run: Run, watch_hint: str, stop_hint: str) -> None:
    """In the child: tell the user (through the parent) where training runs, then write to train.log."""
    log = run.path / "train.log"
    print(
        f"training run '{run.name}' {BACKGROUND} {os.getpid()}; its output goes to {log}\n"
        f"  watch it:  {watch_hint}\n  stop it:   {stop_hint}",
        flush=True,
    )
    redirect_output(log)
