"""Time to quality: validation loss against training wall time, for a preset and for a dense model
with the same active parameters, each trained for the same number of seconds on the same text.

    python benchmarks/time_to_quality.py --seconds 50 --target 1.886

Each model runs headless as its own `moe-tui train` process (one at a time: they would share the
cores otherwise). The curve comes from the eval lines of metrics.jsonl, whose `elapsed` is training
wall time including evaluation. Prints one JSON line per model and a markdown table of the curves.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# Every model: cosine decay to the end of its time budget needs a step count; we give each the
# number of steps it reaches in `seconds` (measured by short calibration runs of the same model).
MODELS = {
    "moe": [],  # the preset as it is (the `cpu` preset: sparse, top-2 of 8 experts)
    # Every token uses both experts: all parameters active, as many as the sparse model's active ones.
    "dense": ["--num-experts", "2", "--top-k", "2", "--aux-loss-coef", "0", "--z-loss-coef", "0"],
}
PROBE_STEPS = 60


def train(name: str, extra: list[str], args, runs: Path, max_iters: int) -> list[dict]:
    command = [
        sys.executable,
        "-m",
        "tui",
        "train",
        args.dataset,
        "--preset",
        args.preset,
        "--headless",
        "--run-name",
        name,
        "--max-iters",
        str(max_iters),
        "--eval-interval",
        str(args.eval_interval),
        "--eval-iters",
        str(args.eval_iters),
        "--sample-interval",
        "1000000",
        "--ckpt-interval",
        "1000000",
        *extra,
    ]
    subprocess.run(command, env={**os.environ, "MOE_TUI_RUNS": str(runs)}, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    return records


def seconds_per_step(name: str, extra: list[str], args, runs: Path) -> float:
    """One short run's own timing of its steps (after the first log line, so start-up is excluded)."""
    records = train(f"{name}-probe", [*extra, "--eval-iters", "1", "--overwrite"], args, runs, PROBE_STEPS)
    started = [r for r in records if r["event"] == "StepMetrics"]
    return (started[-1]["elapsed"] - started[0]["elapsed"]) / (started[-1]["step"] - started[0]["step"])


def step_budgets(models: dict[str, list[str]], args, runs: Path) -> dict[str, int]:
    """How many steps each model takes in `args.seconds`: the median of probes run in turns (a, b, a,
    b...), so that a slow spell on this shared machine does not fall on one model alone."""
    timings: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.probes):
        for name, extra in models.items():
            timings[name].append(seconds_per_step(name, extra, args, runs))
    return {name: int(args.seconds / statistics.median(t)) for name, t in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="shakespeare")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seconds", type=float, default=50)
    parser.add_argument("--target", type=float, default=1.886)
    parser.add_argument("--eval-interval", type=int, default=100)
    parser.add_argument("--eval-iters", type=int, default=10)
    parser.add_argument("--models", default=",".join(MODELS), help="which of: " + ", ".join(MODELS))
    parser.add_argument("--probes", type=int, default=3, help="timing probes per model, taken in turns")
    parser.add_argument("--flags", default="", help="extra `moe-tui train` flags for every model (quoted)")
    args = parser.parse_args()
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        models = {name: [*shlex.split(args.flags), *MODELS[name]] for name in args.models.split(",")}
        budgets = step_budgets(models, args, runs)
        for name, extra in models.items():
            max_iters = budgets[name]
            records = train(name, extra, args, runs, max_iters)
            evals = [r for r in records if r["event"] == "EvalMetrics"]
            start = next(r for r in records if r["event"] == "RunStarted")
            reached = next((r["elapsed"] for r in evals if r["val_loss"] <= args.target), None)
            curves[name] = evals
            print(
                json.dumps(
                    {
                        "model": name,
                        "params": start["params_total"],
                        "active": start["params_active"],
                        "steps": max_iters,
                        "final_val": evals[-1]["val_loss"],
                        "final_elapsed": evals[-1]["elapsed"],
                        f"seconds_to_{args.target}": reached,
                    }
                ),
                flush=True,
            )
    print("\n| model | step | elapsed (s) | val loss (nats/char) |\n|---|---|---|---|")
    for name, evals in curves.items():
        for r in evals:
            print(f"| {name} | {r['step']} | {r['elapsed']:.1f} | {r['val_loss']:.4f} |")


if __name__ == "__main__":
    main()
