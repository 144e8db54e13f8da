"""Resident memory over a long run, headless and with the dashboard (in tmux), sampled from /proc.

    python benchmarks/long_run_memory.py --seconds 600

Trains a small model with frequent events (a log line every step, evals, samples and checkpoints
every few hundred), so that anything that grows per event shows up as growth in RSS. Prints RSS after
warm-up (the first minute), at the end, and the growth per 10,000 steps. Linux only (reads /proc).
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


def measure(front_end: str, seconds: float, runs: Path, warmup: float) -> dict:
    env = {**os.environ, "MOE_TUI_RUNS": str(runs)}
    command = [sys.executable, "-m", "tui", "train", "shakespeare", *SETTINGS, "--run-name", front_end]
    if front_end == "headless":
        proc = subprocess.Popen([*command, "--headless"], env=env, stdout=subprocess.DEVNULL)
        pid = proc.pid
    else:  # the real dashboard in a real terminal
        socket = str(runs / "tmux.sock")
        subprocess.run(
            ["tmux", "-S", socket, "new-session", "-d", "-x", "100", "-y", "30", " ".join(command)], env=env, check=True
        )
        pid = int(subprocess.check_output(["tmux", "-S", socket, "display", "-p", "#{pane_pid}"], text=True))
    run = runs / front_end
    while not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    start = time.monotonic()
    samples = []
    while (elapsed := time.monotonic() - start) < seconds:
        time.sleep(2)
        samples.append((elapsed, last_step(run), rss_mib(pid)))
    os.kill(pid, 15)
    if front_end == "headless":
        proc.wait()
    else:
        time.sleep(5)
        subprocess.run(["tmux", "-S", socket, "kill-server"], check=False, stderr=subprocess.DEVNULL)
    after = [s for s in samples if s[0] >= warmup]
    (_, step0, rss0), (_, step1, rss1) = after[0], after[-1]
    return {
        "front end": front_end,
        "steps": step1,
        "rss after warm-up (MiB)": round(rss0, 1),
        "rss at end (MiB)": round(rss1, 1),
        "peak (MiB)": round(max(s[2] for s in samples), 1),
        "growth per 10k steps (MiB)": round((rss1 - rss0) / max(1, step1 - step0) * 10_000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--warmup", type=float, default=60)
    parser.add_argument("--front-end", choices=["headless", "dashboard", "both"], default="both")
    args = parser.parse_args()
    front_ends = ["headless", "dashboard"] if args.front_end == "both" else [args.front_end]
    if "dashboard" in front_ends and not shutil.which("tmux"):
        sys.exit("the dashboard measurement needs tmux")
    with tempfile.TemporaryDirectory() as tmp:
        for front_end in front_ends:
            print(json.dumps(measure(front_end, args.seconds, Path(tmp), args.warmup)), flush=True)


if __name__ == "__main__":
    main()
