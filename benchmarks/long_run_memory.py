"""Resident memory over a long run: the trainer headless, the training dashboard (in tmux), and a viewer
(`moe-tui watch`, in tmux) attached to a detached run, sampled from /proc.

    python benchmarks/long_run_memory.py --seconds 600
    python benchmarks/long_run_memory.py --front-end viewer --repo /tmp/other-tree

Trains a small model with frequent events (a log line every step, evals, samples and checkpoints
every few hundred), so that anything that grows per event shows up as growth in RSS. Prints RSS at the
first sample, after warm-up (the first minute), at the end, and the growth per 10,000 steps and per
hour; as it goes, RSS every 5 minutes, where whether memory levels off shows. The viewer measurement
also gives the detached trainer's figures (front end "detached trainer"). Linux only (reads /proc);
the dashboard and the viewer need tmux. `--repo`: the checkout whose `moe-tui` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = [
    "--n-layer",
    "2",
    "--n-head",
    "4",
    "--n-embd",
    "64",
    "--block-size",
    "32",
    "--num-experts",
    "4",
    "--top-k",
    "2",
    "--batch-size",
    "16",
    "--log-interval",
    "1",
    "--eval-interval",
    "500",
    "--eval-iters",
    "5",
    "--sample-interval",
    "500",
    "--sample-tokens",
    "100",
    "--ckpt-interval",
    "1000",
    "--max-iters",
    "10000000",
    "--device",
    "cpu",
    # The guard's alerts still come, but the run goes on: detached or on a screen it would pause at the
    # first (validation loss rising, at step 50,000 of this run), and a paused run sends no events.
    "--on-alert",
    "warn",
]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def last_step(run: Path) -> int:
    step = 0
    with open(run / "metrics.jsonl", "rb") as f:
        f.seek(max(0, os.path.getsize(run / "metrics.jsonl") - 4096))
        for line in f.read().decode(errors="replace").splitlines():
            try:
                step = max(step, json.loads(line).get("step") or 0)
            except ValueError:
                pass
    return step


def in_tmux(command: list[str], socket: Path, env: dict, repo: Path) -> int:
    """Start `command` in a terminal of its own (100x30) on a fresh tmux server; its process id."""
    subprocess.run(
        ["tmux", "-S", str(socket), "new-session", "-d", "-x", "100", "-y", "30", "-c", str(repo), " ".join(command)],
        env=env,
        check=True,
    )
    return int(subprocess.check_output(["tmux", "-S", str(socket), "display", "-p", "#{pane_pid}"], text=True))


def detached_pid(run: Path) -> int:
    """The detached trainer's process id, once it has recorded itself in its lease."""
    while True:
        try:
            record = json.loads((run / "process.json").read_text())
            if record.get("state") == "live":
                return record["pid"]
        except (OSError, ValueError):
            pass
        time.sleep(0.2)


def measure(front_end: str, seconds: float, runs: Path, warmup: float, repo: Path) -> list[dict]:
    env = {**os.environ, "MOE_TUI_RUNS": str(runs), "PYTHONPATH": str(repo)}
    command = [sys.executable, "-m", "tui", "train", "shakespeare", *SETTINGS, "--run-name", front_end]
    run = runs / front_end
    if front_end == "headless":
        proc = subprocess.Popen([*command, "--headless"], env=env, stdout=subprocess.DEVNULL, cwd=repo)
        pids = {"headless": proc.pid}
    elif front_end == "dashboard":  # the real dashboard in a real terminal
        pids = {"dashboard": in_tmux(command, runs / "tmux.sock", env, repo)}
    else:  # a detached trainer, and a viewer of it in a real terminal
        subprocess.run([*command, "--detach"], env=env, cwd=repo, check=True, stdout=subprocess.DEVNULL)
        trainer = detached_pid(run)
        viewer = in_tmux([sys.executable, "-m", "tui", "watch", front_end], runs / "tmux.sock", env, repo)
        pids = {"detached trainer": trainer, "viewer": viewer}
    while not (run / "metrics.jsonl").exists():
        if gone := [name for name, pid in pids.items() if not Path(f"/proc/{pid}").exists()]:
            sys.exit(f"{gone[0]} ended before training started; run its command by hand to see why")
        time.sleep(0.2)
    start, due = time.monotonic(), 0.0
    samples = []
    while (elapsed := time.monotonic() - start) < seconds:
        time.sleep(2)
        samples.append((elapsed, last_step(run), {name: rss_mib(pid) for name, pid in pids.items()}))
        if elapsed >= due:  # the series, as it goes: whether memory levels off
            print_sample(*samples[-1])
            due += SERIES_EVERY
    for pid in pids.values():
        os.kill(pid, 15)
    if front_end == "headless":
        proc.wait()
    else:
        while (run / "process.json").exists() and '"live"' in (run / "process.json").read_text():
            time.sleep(0.5)  # the trainer saves and leaves
        subprocess.run(["tmux", "-S", str(runs / "tmux.sock"), "kill-server"], check=False, stderr=subprocess.DEVNULL)
    print_sample(*samples[-1])
    after = [s for s in samples if s[0] >= warmup]
    (time0, step0, rss0), (time1, step1, rss1) = after[0], after[-1]
    return [
        {
            "front end": name,
            "steps": step1,
            "rss at first sample (MiB)": round(samples[0][2][name], 1),
            "rss after warm-up (MiB)": round(rss0[name], 1),
            "rss at end (MiB)": round(rss1[name], 1),
            "peak (MiB)": round(max(s[2][name] for s in samples), 1),
            "growth per 10k steps (MiB)": round((rss1[name] - rss0[name]) / max(1, step1 - step0) * 10_000, 2),
            # Growth with the clock rather than with steps (redraws, a viewer's polls) shows here.
            "growth per hour (MiB)": round((rss1[name] - rss0[name]) / max(1.0, time1 - time0) * 3600, 2),
        }
        for name in pids
    ]


SERIES_EVERY = 300  # seconds between the lines of RSS printed as the run goes


def print_sample(elapsed: float, step: int, rss: dict[str, float]) -> None:
    figures = ", ".join(f"{name} {mib:.1f} MiB" for name, mib in rss.items())
    print(f"minute {elapsed / 60:5.1f}  step {step:7d}  {figures}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--warmup", type=float, default=60)
    parser.add_argument("--front-end", choices=["headless", "dashboard", "viewer", "all"], default="all")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    front_ends = ["headless", "dashboard", "viewer"] if args.front_end == "all" else [args.front_end]
    if {"dashboard", "viewer"} & set(front_ends) and not shutil.which("tmux"):
        sys.exit("the dashboard and viewer measurements need tmux")
    with tempfile.TemporaryDirectory() as tmp:
        for front_end in front_ends:
            for figures in measure(front_end, args.seconds, Path(tmp), args.warmup, args.repo.resolve()):
                print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
