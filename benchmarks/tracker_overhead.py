"""What experiment tracking costs training: tokens/s with all four trackers on against none, side by side.

    python benchmarks/tracker_overhead.py --steps 300 --rounds 3

Each round trains the `cpu` preset on Simpsons twice, as real `moe-tui train --headless` processes, in
alternating order: once with no tracker, once with `--track tensorboard --track mlflow --track wandb
--track trackio` (W&B offline, MLflow and Trackio into temporary stores: no network). The figures per
setting are medians over rounds of: tokens/s over the whole run, tokens/s after the first 50 steps (the
trackers start up meanwhile: imports, MLflow's database, W&B's service), and the process's wall time,
start to exit (the trackers' imports and their final flush included). Prints one JSON line and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRACKERS = ["--track", "tensorboard", "--track", "mlflow", "--track", "wandb", "--track", "trackio"]


def train(runs: Path, name: str, steps: int, tracked: bool, env: dict) -> dict:
    args = [
        sys.executable,
        "-m",
        "tui",
        "train",
        "simpsons",
        "--preset",
        "cpu",
        "--max-iters",
        str(steps),
        "--eval-interval",
        "100",
        "--sample-interval",
        "100",
        "--ckpt-interval",
        str(steps),
        "--log-interval",
        "10",
        "--run-name",
        name,
        "--headless",
        "--runs-dir",
        str(runs),
    ]
    start = time.perf_counter()
    subprocess.run(args + (TRACKERS if tracked else []), env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    rates = [
        (r["step"], r["tokens_per_sec"])
        for r in map(json.loads, (runs / name / "metrics.jsonl").open())
        if r["event"] == "StepMetrics"
    ]
    return {
        "all": statistics.mean(rate for _, rate in rates),
        "after_50": statistics.mean(rate for step, rate in rates if step > 50),
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"none": [], "all four": []}
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "TRACKIO_DIR": f"{tmp}/trackio",
            "WANDB_MODE": "offline",
            "WANDB_CONFIG_DIR": f"{tmp}/wandb-config",
            "WANDB_CACHE_DIR": f"{tmp}/wandb-cache",
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        for round_ in range(args.rounds):
            order = ["none", "all four"] if round_ % 2 == 0 else ["all four", "none"]
            for setting in order:
                figures = train(
                    Path(tmp) / "runs", f"r{round_}-{setting.replace(' ', '')}", args.steps, setting != "none", env
                )
                results[setting].append(figures)
                print(
                    f"round {round_ + 1} {setting}: " + ", ".join(f"{k} {v:,.1f}" for k, v in figures.items()),
                    file=sys.stderr,
                )
    median = {
        setting: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for setting, runs in results.items()
    }
    print(json.dumps({"steps": args.steps, "rounds": args.rounds, "median": median, "runs": results}))
    base = median["none"]
    print("| trackers | tokens/s, whole run | tokens/s after step 50 | wall time, process |\n|---|---|---|---|")
    for setting, m in median.items():
        print(
            f"| {setting} | {m['all']:,.0f} ({m['all'] / base['all'] - 1:+.1%}) | {m['after_50']:,.0f} "
            f"({m['after_50'] / base['after_50'] - 1:+.1%}) | {m['wall']:.1f} s ({m['wall'] - base['wall']:+.1f} s) |"
        )


if __name__ == "__main__":
    main()
