"""Data and expert parallelism on this machine: training tokens/s with 1 process and with N
(`--nproc N`, and `--nproc N --expert-parallel`), same model, same global batch.

    python benchmarks/data_parallel.py --steps 60 --rounds 3 --nproc 2

Each setting is a real `moe-tui train --headless` run of the `cpu` preset on Simpsons with nothing
scheduled but training; the settings take turns, round by round (in alternating order), so that a
noisy neighbour slows all alike. The settings: 1 process with 1 torch thread, 1 process with all the
cores as threads, and N processes with cores / N threads each (what `--nproc` sets), holding the
whole model each or (`--expert-parallel`) 1/N of the experts each. The figure for
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

import torch

QUIET = [
    "--eval-interval",
    "1000000",
    "--sample-interval",
    "1000000",
    "--ckpt-interval",
    "1000000",
    "--log-interval",
    "10",
    "--preset",
    "cpu",
    "--device",
    "cpu",
]


def tokens_per_second(nproc: int, threads: int, experts_split: bool, steps: int, runs: Path, name: str) -> float:
    env = {**os.environ, "MOE_TUI_RUNS": str(runs), "OMP_NUM_THREADS": str(threads)}
    extra = (["--nproc", str(nproc)] if nproc > 1 else []) + (["--expert-parallel"] if experts_split else [])
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tui",
            "train",
            "simpsons",
            *QUIET,
            "--max-iters",
            str(steps),
            "--run-name",
            name,
            "--headless",
            *extra,
        ],
        env=env,
        check=True,
        capture_output=True,
    )
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
    each = max(1, cores // args.nproc)
    # (processes, threads each, experts split over the processes)
    settings = [(1, 1, False), (1, cores, False), (args.nproc, each, False), (args.nproc, each, True)]
    figures: dict[tuple[int, int, bool], list[float]] = {s: [] for s in settings}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for n, t, ep in settings if round_ % 2 == 0 else reversed(settings):
                rate = tokens_per_second(n, t, ep, args.steps, Path(scratch), f"r{round_}-n{n}-t{t}-{ep}")
                figures[n, t, ep].append(rate)
                print(f"round {round_ + 1}: {label(n, t, ep)}: {rate:,.0f} tok/s", file=sys.stderr)
    load_after = os.getloadavg()
    median = {s: statistics.median(v) for s, v in figures.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(
        json.dumps(
            {
                "machine": f"{platform.processor() or platform.machine()}, {cores} cores",
                "commit": commit,
                "steps": args.steps,
                "load_before": load_before,
                "load_after": load_after,
                "rounds": {label(*s): v for s, v in figures.items()},
                "median": {label(*s): v for s, v in median.items()},
                "parameters_per_process": {label(*s): held(*s) for s in settings},
            }
        )
    )
    base = median[1, 1, False]
    print(
        "\n| processes x threads | parameters per process | tokens/s (median) | rounds | vs 1 x 1 |\n"
        "|---|---|---|---|---|"
    )
    for s in settings:
        print(
            f"| {label(*s)} | {held(*s):,} | {median[s]:,.0f} | {', '.join(f'{v:,.0f}' for v in figures[s])} | "
            f"{median[s] / base:.2f}x |"
        )


def label(n: int, t: int, experts_split: bool) -> str:
    return f"{n} x {t}" + (", experts split" if experts_split else "")


def held(n: int, t: int, experts_split: bool) -> int:
    """Parameters each process holds: the whole `cpu`-preset model, or its share of the experts."""
    from moe_core.config import build_config
    from moe_core.data.corpus import default_data_dir, load_corpus
    from moe_core.model.transformer import MoETransformer

    vocab = set(load_corpus("simpsons", default_data_dir()).text)
    with torch.device("meta"):  # shapes only
        model = MoETransformer(build_config("cpu", {}, {}), len(vocab))
    experts = sum(p.numel() for block in model.blocks for p in block.moe.experts.parameters())
    total = sum(p.numel() for p in model.parameters())
    return total - experts + experts // n if experts_split else total


if __name__ == "__main__":
    main()
