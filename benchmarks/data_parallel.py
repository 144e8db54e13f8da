"""Data parallelism on this machine: training tokens/s with 1 process and with N (`--nproc N`), same
model, same global batch.

    python benchmarks/data_parallel.py --steps 150 --rounds 3 --nproc 2

Each setting is a real `moe-tui train --headless` run of the `cpu` preset on Simpsons with nothing
scheduled but training; the settings take turns, round by round, so that a noisy neighbour slows
both alike. One process gets all the cores as torch threads; N processes get cores / N threads each
(what `--nproc` sets). The figure for a run is the median tokens/s of its log lines, the first left
out (it includes start-up); the figure for a setting, the median over rounds. Prints one JSON line
and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

QUIET = ["--eval-interval", "1000000", "--sample-interval", "1000000", "--ckpt-interval", "1000000",
         "--log-interval", "10", "--preset", "cpu", "--device", "cpu"]


def tokens_per_second(nproc: int, steps: int, runs: Path, name: str) -> float:
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "MOE_TUI_RUNS": str(runs), "OMP_NUM_THREADS": str(threads)}
    extra = ["--nproc", str(nproc)] if nproc > 1 else []
    subprocess.run([sys.executable, "-m", "tui", "train", "simpsons", *QUIET, "--max-iters", str(steps),
                    "--run-name", name, "--headless", *extra], env=env, check=True, capture_output=True)
    lines = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_sec"] for r in lines if r["event"] == "StepMetrics"][1:]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    settings = [1, args.nproc]
    figures: dict[int, list[float]] = {n: [] for n in settings}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for n in settings if round_ % 2 == 0 else reversed(settings):
                figures[n].append(tokens_per_second(n, args.steps, Path(scratch), f"r{round_}-n{n}"))
                print(f"round {round_ + 1}: {n} process(es): {figures[n][-1]:,.0f} tok/s", file=sys.stderr)
    median = {n: statistics.median(v) for n, v in figures.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                      "commit": commit, "steps": args.steps, "rounds": figures, "median": median}))
    print("\n| processes | tokens/s (median) | rounds | vs 1 process |\n|---|---|---|---|")
    for n in settings:
        print(f"| {n} | {median[n]:,.0f} | {', '.join(f'{v:,.0f}' for v in figures[n])} | "
              f"{median[n] / median[1]:.2f}× |")


if __name__ == "__main__":
    main()
