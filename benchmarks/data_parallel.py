"""Data parallelism on this machine: training tokens/s with 1 process and with N (`--nproc N`), same
model, same global batch.

    python benchmarks/data_parallel.py --steps 60 --rounds 3 --nproc 2

Each setting is a real `moe-tui train --headless` run of the `cpu` preset on Simpsons with nothing
scheduled but training; the settings take turns, round by round (in alternating order), so that a
noisy neighbour slows all alike. The settings: 1 process with 1 torch thread, 1 process with all the
cores as threads, and N processes with cores / N threads each (what `--nproc` sets). The figure for
a run is the median tokens/s of its log lines, the first left out (it includes start-up); the figure
for a setting, the median over rounds. The load average before and after is printed with them: on a
shared machine it says how much the figures are worth. Prints one JSON line and a markdown table.
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


def tokens_per_second(nproc: int, threads: int, steps: int, runs: Path, name: str) -> float:
    env = {**os.environ, "MOE_TUI_RUNS": str(runs), "OMP_NUM_THREADS": str(threads)}
    extra = ["--nproc", str(nproc)] if nproc > 1 else []
    subprocess.run([sys.executable, "-m", "tui", "train", "simpsons", *QUIET, "--max-iters", str(steps),
                    "--run-name", name, "--headless", *extra], env=env, check=True, capture_output=True)
    lines = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_sec"] for r in lines if r["event"] == "StepMetrics"][1:]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    settings = [(1, 1), (1, cores), (args.nproc, max(1, cores // args.nproc))]  # (processes, threads each)
    figures: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for n, t in settings if round_ % 2 == 0 else reversed(settings):
                figures[n, t].append(tokens_per_second(n, t, args.steps, Path(scratch), f"r{round_}-n{n}-t{t}"))
                print(f"round {round_ + 1}: {n} process(es) x {t} thread(s): {figures[n, t][-1]:,.0f} tok/s",
                      file=sys.stderr)
    load_after = os.getloadavg()
    median = {s: statistics.median(v) for s, v in figures.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {cores} cores", "commit": commit,
                      "steps": args.steps, "load_before": load_before, "load_after": load_after,
                      "rounds": {f"{n}x{t}": v for (n, t), v in figures.items()},
                      "median": {f"{n}x{t}": v for (n, t), v in median.items()}}))
    base = median[1, 1]
    print("\n| processes x threads | tokens/s (median) | rounds | vs 1 x 1 |\n|---|---|---|---|")
    for n, t in settings:
        print(f"| {n} x {t} | {median[n, t]:,.0f} | {', '.join(f'{v:,.0f}' for v in figures[n, t])} | "
              f"{median[n, t] / base:.2f}x |")


if __name__ == "__main__":
    main()
