"""Commands for runs that train elsewhere: `watch` (the dashboard as a viewer) and `stop`."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from moe_core.errors import UserError
from moe_core.hints import resume_command, stop_command
from moe_core.live.client import TrainerGone, live_client
from moe_core.live.lease import PROCESS_FILE, is_live, process_gone, read_status
from moe_core.store.checkpoint import step_checkpoints
from moe_core.store.runs import Run, default_runs_dir, list_run_names
from tui.options import RunsDir

STOP_TIMEOUT_SECONDS = 600.0  # a large model's checkpoint on a slow disk still gets this long
STARTING_SECONDS = 60.0  # a trainer holds the lock while it loads data and builds the model, then records itself


def watch(
    runs: Annotated[
        Optional[list[str]],
        typer.Argument(help="Runs to watch, overlaid \\[default: the most recently updated]", show_default=False),
    ] = None,
    runs_dir: RunsDir = None,
) -> None:
    """Watch runs in the dashboard, live or finished, however they were started; quitting never stops training."""
    from moe_core.live.follow import RunFollower

    runs_dir = runs_dir or default_runs_dir()
    names = list(dict.fromkeys(runs or [most_recent_run(runs_dir)]))
    followers = [RunFollower(Run.open(runs_dir, name), resume_command(name, runs_dir)) for name in names]
    for follower in followers:
        follower.attach()  # another user's socket, another protocol: said here, before the screen opens
    if not (sys.stdout.isatty() and sys.stdin.isatty()):
        log = followers[0].run.path / "train.log"
        raise UserError(
            f"moe-tui watch draws a dashboard and needs a terminal; without one, follow a run's "
            f"plain lines with `tail -f {log}` (written by --detach)"
        )
    from tui.dashboard.runner import run_viewer

    raise typer.Exit(run_viewer(followers, runs_dir))


def most_recent_run(runs_dir: Path) -> str:
    names = list_run_names(runs_dir)
    if not names:
        raise UserError(
            f"no runs in {Path(runs_dir).resolve()} to watch; start one with `moe-tui train "
            "--detach`, or pass --runs-dir"
        )
    return max(names, key=lambda name: _updated(Path(runs_dir) / name))


def _updated(path: Path) -> float:
    stamps = [(path / f).stat().st_mtime for f in ("metrics.jsonl", PROCESS_FILE, "config.toml") if (path / f).exists()]
    return max(stamps, default=0.0)


def stop(run: Annotated[str, typer.Argument(help="Run name (see `moe-tui runs`)")], runs_dir: RunsDir = None) -> None:
    """Save a checkpoint and stop a live run, from any shell; returns once its process has exited."""
    runs_dir = runs_dir or default_runs_dir()
    target = Run.open(runs_dir, run)
    status = read_status(target)
    deadline = time.monotonic() + STARTING_SECONDS
    while status.state == "starting" and time.monotonic() < deadline:  # a trainer setting itself up
        time.sleep(0.2)
        status = read_status(target)
    if status.state == "starting":
        raise UserError(
            f"run '{run}' has been starting for {STARTING_SECONDS:.0f} s without a trainer "
            f"recording itself; try `{stop_command(run, runs_dir)}` again shortly"
        )
    if status.state != "live":
        ended = f" at step {status.step}" if status.step is not None else ""
        print(f"run '{run}' is not running ({status.describe()}{ended}); nothing to stop", file=sys.stderr)
        return
    client = live_client(target)
    if client is not None:
        try:
            client.send("stop")
            client.wait_for(lambda m: m.get("type") == "reply" and m.get("cmd") == "stop", timeout=10)
        except TrainerGone:
            pass  # it exited between the two: the wait below sees it
        finally:
            client.close()
    elif status.pid and status.host == socket.gethostname():  # no control channel: SIGTERM also saves and stops
        os.kill(status.pid, signal.SIGTERM)
    else:
        raise UserError(
            f"run '{run}' is trained by process {status.pid} on {status.host}, which this machine "
            "cannot reach; run `moe-tui stop` there"
        )
    print(f"stopping run '{run}' (process {status.pid}): saving a checkpoint ...", file=sys.stderr)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    same_host = status.host == socket.gethostname()
    while is_live(target) or (same_host and status.pid and not process_gone(status.pid)):
        if time.monotonic() > deadline:
            print(f"run '{run}' is still running after {STOP_TIMEOUT_SECONDS:.0f} s", file=sys.stderr)
            raise typer.Exit(1)
        time.sleep(0.1)
    status = read_status(target)
    newest = step_checkpoints(target.checkpoints)
    saved = newest[0][1].name if newest else "none"
    print(
        f"stopped run '{run}' at step {status.step}; its last checkpoint is {saved}; resume with: "
        f"{resume_command(run, runs_dir)}"
    )
