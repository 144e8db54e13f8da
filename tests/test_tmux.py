"""End to end in a real terminal: `moe-tui train simpsons` in tmux, driven by keys, read off the screen."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_core.live.lease import is_live
from moe_core.store.runs import Run
from tests.conftest import QUIET_FLAGS, TINY_FLAGS

TMUX = shutil.which("tmux")
MOE_TUI = Path(sys.executable).with_name("moe-tui")
pytestmark = [
    pytest.mark.skipif(TMUX is None, reason="tmux is not installed (.ci/run installs it)"),
    pytest.mark.skipif(not MOE_TUI.is_file(), reason="the moe-tui console script is not installed"),
]


class Terminal:
    """One tmux server of our own (its own socket), one window of a fixed size."""

    def __init__(self, tmp_path: Path, width: int = 100, height: int = 30):
        self.socket = f"moe-tui-test-{os.getpid()}-{tmp_path.name}"
        self.width, self.height = width, height

    def tmux(self, *args: str, env: dict | None = None) -> str:
        return subprocess.run(
            [TMUX, "-L", self.socket, *args], capture_output=True, text=True, env=env, timeout=30
        ).stdout

    def start(self, command: str, env: dict) -> None:
        self.tmux("new-session", "-d", "-s", "main", "-x", str(self.width), "-y", str(self.height), command, env=env)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "main")

    def send(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "main", *keys)

    def wait_for(self, pattern: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if re.search(pattern, screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not on screen after {timeout}s:\n{screen}")
            time.sleep(0.1)

    def close(self) -> None:
        self.tmux("kill-server")


@pytest.fixture
def terminal(tmp_path):
    term = Terminal(tmp_path)
    yield term
    term.close()


@pytest.fixture
def user_env(tmp_path, shared_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TMUX")}
    env.update(MOE_TUI_DATA=str(shared_dir), MOE_TUI_RUNS=str(tmp_path / "runs"))
    return env


def train_command(*extra: str, on_hangup: str | None = "stop") -> str:
    """The command line; closing a test's terminal must not leave a dashboard training on without one
    (what a hangup does by default), so a lost terminal stops training unless `on_hangup=None`."""
    hangup = ["--on-hangup", on_hangup] if on_hangup else []
    return " ".join(
        [str(MOE_TUI), "train", "simpsons", "--run-name", "e2e", *TINY_FLAGS, *QUIET_FLAGS, *hangup, *extra]
    )


def shown_step(screen: str) -> int:
    return int(re.search(r"step (\d+)/100000", screen).group(1))


def test_train_pause_save_and_quit_in_a_real_terminal(terminal, user_env, tmp_path):
    terminal.start(f"{train_command()}; echo exit=$?; sleep 600", user_env)
    screen = terminal.wait_for(r"RUNNING +step [1-9]\d*/100000")
    for panel in ("loss, nats/char", "experts", "samples", "events", "space Pause", "q Quit"):
        assert panel in screen

    terminal.send("Space")
    screen = terminal.wait_for(r"PAUSED +step")
    paused_at = shown_step(screen)

    # The paused trainer answers the save at the step it stands at, and stays there.
    terminal.send("c")
    screen = terminal.wait_for(r"✓ saved step-\d+")
    assert f"✓ saved step-{paused_at:08d}" in screen
    assert re.search(r"PAUSED +step", screen) and shown_step(screen) == paused_at
    assert (tmp_path / "runs" / "e2e" / "checkpoints" / f"step-{paused_at:08d}").is_dir()

    terminal.send("Space")
    terminal.wait_for(r"RUNNING +step")
    terminal.send("q")
    terminal.wait_for(r"Stop training and quit\?")
    terminal.send("y")
    screen = terminal.wait_for(r"exit=\d+")
    assert "exit=0" in screen
    assert "resume with: moe-tui train --resume e2e" in screen
    steps = sorted((tmp_path / "runs" / "e2e" / "checkpoints").glob("step-*"))
    assert len(steps) == 2 and steps[-1].name > f"step-{paused_at:08d}"  # quitting saved the last step


# The session leader in the terminal, as a login shell is over SSH: on hangup it passes SIGHUP on to
# its job (bash does the same), then records the job's pid and exit status.
LOGIN_SHELL = """
import signal, subprocess, sys
job = subprocess.Popen(sys.argv[2:])
open(sys.argv[1] + ".pid", "w").write(str(job.pid))
signal.signal(signal.SIGHUP, lambda *_: job.send_signal(signal.SIGHUP))
open(sys.argv[1], "w").write(str(job.wait()))
"""


def start_under_login_shell(
    terminal, user_env, tmp_path, keep_screen: bool = False, on_hangup: str | None = "stop"
) -> Path:
    """Start training under LOGIN_SHELL; with `keep_screen` the window stays up after it exits."""
    exit_file = tmp_path / "exit"
    command = f"{sys.executable} -c {shlex.quote(LOGIN_SHELL)} {exit_file} {train_command(on_hangup=on_hangup)}"
    terminal.start(f"{command}; sleep 600" if keep_screen else f"exec {command}", user_env)
    terminal.wait_for(r"RUNNING +step [1-9]\d*/100000")
    return exit_file


def exit_status(exit_file: Path) -> int:
    deadline = time.monotonic() + 60
    while not (exit_file.is_file() and exit_file.read_text().strip()):
        assert time.monotonic() < deadline, "moe-tui did not exit after the signal"
        time.sleep(0.05)
    return int(exit_file.read_text())


def test_with_on_hangup_stop_a_lost_connection_saves_and_exits_129(terminal, user_env, tmp_path):
    exit_file = start_under_login_shell(terminal, user_env, tmp_path, on_hangup="stop")
    terminal.close()  # the terminal goes away, as when an SSH connection drops
    assert exit_status(exit_file) == 129  # a clean exit of its own, not killed by the signal
    assert list((tmp_path / "runs" / "e2e" / "checkpoints").glob("step-*")), "no checkpoint saved on hangup"


def test_a_lost_connection_keeps_training_and_watch_reattaches(terminal, user_env, tmp_path):
    run = Run(tmp_path / "runs" / "e2e")
    exit_file = start_under_login_shell(terminal, user_env, tmp_path, on_hangup=None)  # the default: keep
    pid = int(Path(f"{exit_file}.pid").read_text())
    try:
        terminal.close()  # a real SIGHUP, from tmux to the login shell to moe-tui
        log = run.path / "train.log"
        steps = lambda: [r["step"] for r in run.read_metrics() if r.get("event") == "StepMetrics"]
        deadline = time.monotonic() + 60
        while not (log.is_file() and "terminal lost (SIGHUP); training goes on" in log.read_text()):
            assert time.monotonic() < deadline, "the hangup was not taken"
            time.sleep(0.1)
        before = max(steps(), default=0)
        while max(steps(), default=0) < before + 20:
            assert time.monotonic() < deadline, "no steps after the hangup"
            time.sleep(0.1)
        assert not exit_file.read_text().strip() and is_live(run), "training stopped with the terminal"

        viewer = Terminal(tmp_path / "viewer")
        viewer.start(f"{MOE_TUI} watch e2e; echo exit=$?; sleep 600", user_env)
        try:
            screen = viewer.wait_for(r"RUNNING +step (\d+)/100000")
            assert shown_step(screen) > before
            viewer.send("q")  # leaving the viewer leaves training alone
            viewer.wait_for("exit=0")
        finally:
            viewer.close()
        assert is_live(run)
        stop = subprocess.run([str(MOE_TUI), "stop", "e2e"], env=user_env, capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr
        assert exit_status(exit_file) == 0  # stopped on request: a clean exit
        assert "stopped run 'e2e' at step" in stop.stdout
    finally:
        if is_live(run):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_kill_saves_and_exits_128_plus_n_with_the_resume_command_on_screen(sig, terminal, user_env, tmp_path):
    exit_file = start_under_login_shell(terminal, user_env, tmp_path, keep_screen=True)
    os.kill(int(Path(f"{exit_file}.pid").read_text()), sig)
    assert exit_status(exit_file) == 128 + sig
    terminal.wait_for("resume with: moe-tui train --resume e2e")
    assert list((tmp_path / "runs" / "e2e" / "checkpoints").glob("step-*")), f"no checkpoint saved on {sig.name}"
