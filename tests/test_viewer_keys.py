"""Runs that train on without their terminal, end to end with real processes: a detached trainer stopped
by SIGINT or SIGTERM and the exit code it ends with, what `moe-tui runs` says of live, stopped and
crashed runs, and `moe-tui watch` in a real terminal (tmux) on a headless run that lost its own
terminal: with no RUN and with several, and its keys e, S and Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from moe_core.live.lease import is_live, read_status
from moe_core.store.runs import Run
from tests.conftest import QUIET_FLAGS, REPO, TINY_FLAGS, cli, shared_data_dir, start_moe_tui
from tests.test_cli import table_row
from tests.test_tmux import MOE_TUI, TMUX, Terminal

# Stands in for the login shell or service manager a detached trainer ends up under: made a child
# subreaper, it inherits the trainers once their `moe-tui train --detach` has returned, so it can wait
# for them and say how each exited, as it could not for processes that were never its children.
REAPER = """
import ctypes, json, os, subprocess, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
starters = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True) for args in json.loads(sys.argv[1])]
for starter in starters:
    print(starter.communicate()[0], flush=True)
print("ready", flush=True)
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    print(f"exited {pid} {os.waitstatus_to_exitcode(status)}", flush=True)
"""


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def logged_steps(run: Run) -> list[int]:
    return [r["step"] for r in run.read_metrics() if r.get("event") == "StepMetrics"]


def states(capsys) -> dict[str, str]:
    code, out, err = cli(capsys, "runs")
    assert code == 0, err
    return {name: table_row(out, name)[2] for name in ("int", "term", "killed", "tiny")}


def test_detached_runs_exit_130_on_sigint_and_143_on_sigterm_and_runs_shows_each_state(
    env, trained_once, capsys, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "250")  # one line per row of `moe-tui runs`
    detach = [
        [sys.executable, "-m", "tui", "train", "simpsons", "--run-name", name, "--detach", *TINY_FLAGS, *QUIET_FLAGS]
        for name in ("int", "term")
    ]
    reaper = subprocess.Popen(
        [sys.executable, "-c", REAPER, json.dumps(detach)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "MOE_TUI_DATA": str(shared_data_dir()), "PYTHONUNBUFFERED": "1"},
    )
    said = ""
    for line in reaper.stdout:
        if line.strip() == "ready":
            break
        said += line
    pids = {
        name: int(pid) for name, pid in re.findall(r"training run '(\w+)' in the background as process (\d+)", said)
    }
    try:
        assert pids.keys() == {"int", "term"}, said
        runs = {name: Run(env / name) for name in pids}
        # A run whose trainer was killed -9: one that records itself as a trainer does, then killed.
        shutil.copytree(trained_once, env / "tiny")
        shutil.copytree(trained_once, env / "killed")
        holder = subprocess.Popen(
            [sys.executable, "-m", "tests.other_trainer", str(env / "killed"), "live", "120"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert holder.stdout.readline().strip() == "ready"
        holder.kill()
        holder.wait()

        wait_for(lambda: all(logged_steps(run) for run in runs.values()), "both detached runs to log steps")
        assert states(capsys) == {
            "int": f"live (PID {pids['int']})",
            "term": f"live (PID {pids['term']})",
            "killed": "crashed",
            "tiny": "finished",
        }

        os.kill(pids["int"], signal.SIGINT)
        os.kill(pids["term"], signal.SIGTERM)
        rest, _ = reaper.communicate(timeout=120)  # the reaper returns once both trainers have exited
        exits = dict(re.findall(r"exited (\d+) (-?\d+)", rest))
        assert (exits[str(pids["int"])], exits[str(pids["term"])]) == ("130", "143")
        after = states(capsys)
        assert (after["int"], after["term"], after["killed"]) == ("stopped", "stopped", "crashed")
        for name, run in runs.items():
            step = read_status(run).step
            assert run.checkpoint("latest").name == f"step-{step:08d}"  # the step it stopped at, saved
            assert f"resume with: moe-tui train --resume {name}" in (run.path / "train.log").read_text()
    finally:
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        reaper.kill()
        reaper.wait()


@pytest.mark.skipif(TMUX is None or not MOE_TUI.is_file(), reason="needs tmux and the moe-tui console script")
def test_watch_and_its_keys_on_a_headless_run_that_kept_training_after_a_hangup(env, trained_once, tmp_path):
    shutil.copytree(trained_once, env / "tiny")  # a finished run, updated long before the live one
    run = Run(env / "live")
    trainer = start_moe_tui(
        ["train", "simpsons", "--run-name", "live", *TINY_FLAGS, *QUIET_FLAGS, "--headless", "--on-hangup", "keep"], env
    )
    viewer = Terminal(tmp_path / "viewer")
    try:
        for line in trainer.stdout:
            if line.startswith("step "):
                break
        # --on-hangup keep: the terminal gone, training goes on, its output in train.log.
        trainer.send_signal(signal.SIGHUP)
        log = run.path / "train.log"
        wait_for(lambda: log.is_file() and "terminal lost (SIGHUP); training goes on" in log.read_text(), "the hangup")
        hung_up_at = max(logged_steps(run))
        wait_for(lambda: max(logged_steps(run)) >= hung_up_at + 10, "steps after the hangup")
        assert trainer.poll() is None and is_live(run)

        user_env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TMUX")}
        user_env.update(MOE_TUI_DATA=str(shared_data_dir()), MOE_TUI_RUNS=str(env))
        # With no RUN: the most recently updated one. Then, after a key, two runs overlaid.
        viewer.start(
            f"{MOE_TUI} watch; echo exit=$?; read; {MOE_TUI} watch live tiny; echo exit=$?; sleep 600", user_env
        )
        viewer.wait_for(r"RUNNING +step")
        viewer.wait_for(r"live · simpsons")
        assert not any(r.get("event") == "EvalMetrics" for r in run.read_metrics())
        viewer.send("e")  # evaluate now (the run's own interval is 100000 steps)
        wait_for(lambda: any(r.get("event") == "EvalMetrics" for r in run.read_metrics()), "the evaluation asked for")
        viewer.send("C-c")  # the viewer leaves, with exit code 0 however it ends; training goes on
        viewer.wait_for(r"exit=0")
        steps = max(logged_steps(run))
        wait_for(lambda: max(logged_steps(run)) > steps, "steps after the viewer left")
        assert trainer.poll() is None

        viewer.send("Enter")
        viewer.wait_for(r"\[1/2\] live")
        viewer.wait_for(r"● live.*■ tiny")
        viewer.send("n")
        viewer.wait_for(r"\[2/2\] tiny")
        viewer.send("n")
        viewer.wait_for(r"\[1/2\] live")
        viewer.send("S")  # stop the run it shows, once asked
        viewer.wait_for(r"Stop training run live\?")
        viewer.send("y")
        assert trainer.wait(timeout=120) == 0  # stopped on request: a clean exit
        assert read_status(run).state == "stopped"
        assert run.checkpoint("latest").name == f"step-{read_status(run).step:08d}"
        viewer.send("q")
        viewer.wait_for(r"exit=0\s+exit=0")
    finally:
        viewer.close()
        if trainer.poll() is None:
            trainer.kill()
        trainer.communicate()
