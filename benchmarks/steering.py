"""What steering costs and how fast it acts: tokens/s with the guard on against off, side by side, and
how many steps pass between `moe-tui set` and the change.

    python benchmarks/steering.py --steps 300 --rounds 3 --sets 10

Guard: each round trains the `cpu` preset on Simpsons twice, as real `moe-tui train --headless`
processes in alternating order, with `--guard on` and `--guard off`; the figure per setting is the
median over rounds of the mean tokens/s of its log lines after the first 50 steps.

Latency: one detached run of the `cpu` preset; `--sets` times, the trainer's step is read from a fresh
greeting of its control channel, a set command is sent at once on that connection, and the step its
`SettingsChanged` event names is compared with it; and `moe-tui set` is timed as a command (its process
start-up included). Prints one JSON line and a summary.
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

from moe_core.events import SettingsChanged
from moe_core.live.client import live_client
from moe_core.store.runs import Run

REPO = Path(__file__).resolve().parents[1]
CPU = ["--preset", "cpu", "--eval-interval", "100", "--sample-interval", "100", "--log-interval", "10"]


def moe_tui(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tui", *args], env=env, cwd=REPO, check=True, capture_output=True,
                          text=True)  # fmt: skip


def tokens_per_sec(runs: Path, name: str, steps: int, guard: str, env: dict) -> float:
    moe_tui("train", "simpsons", *CPU, "--max-iters", str(steps), "--ckpt-interval", str(steps), "--guard", guard,
            "--run-name", name, "--headless", "--runs-dir", str(runs), env=env)  # fmt: skip
    records = [json.loads(line) for line in (runs / name / "metrics.jsonl").open()]
    return statistics.mean(r["tokens_per_sec"] for r in records if r["event"] == "StepMetrics" and r["step"] > 50)


def set_latency(runs: Path, sets: int, env: dict) -> tuple[list[int], list[float]]:
    """Steps between the trainer's step when a set command is sent (a fresh greeting's) and the step its
    SettingsChanged names; and the wall seconds of `moe-tui set` as a command, process start included."""
    moe_tui("train", "simpsons", *CPU, "--max-iters", "100000", "--ckpt-interval", "100000", "--run-name", "live",
            "--detach", "--runs-dir", str(runs), env=env)  # fmt: skip
    run, lags, walls = Run.open(runs, "live"), [], []
    try:
        for i in range(sets):
            time.sleep(0.3)
            client = live_client(run)
            before = client.hello["step"]
            client.send("set", changes={"eval_interval": 100 + i + 1}, source="bench")
            client.close()
            while not (changed := [e for e in run.events() if isinstance(e, SettingsChanged) and e.source == "bench"
                                   and e.new == 100 + i + 1]):  # fmt: skip
                time.sleep(0.01)
            lags.append(changed[0].step - before)
            start = time.perf_counter()
            moe_tui("set", "live", f"sample_interval={200 + i}", "--runs-dir", str(runs), env=env)
            walls.append(time.perf_counter() - start)
    finally:
        subprocess.run([sys.executable, "-m", "tui", "stop", "live", "--runs-dir", str(runs)], env=env, cwd=REPO,
                       capture_output=True)  # fmt: skip
    return lags, walls


def guard_seconds_per_log_line(lines: int = 2000) -> float:
    """The guard's own work per log line (a StepMetrics and a RouterStats of 4 layers of 8 experts), timed
    in this process: what it adds to training, spread over the steps of a log interval."""
    from moe_core.config import Config
    from moe_core.events import LayerRouting, RouterStats, StepMetrics
    from moe_core.train.control import Control
    from moe_core.train.guard import Guard

    guard = Guard(Config(num_experts=8, n_layer=4), Control(), "pause")
    layers = [LayerRouting([0.125] * 8, 0.0, 1.9) for _ in range(4)]
    start = time.perf_counter()
    for i in range(lines):
        guard(StepMetrics(10 * i, 2.0, 1.0, 1.0, 1e-3, 1.0, 20_000.0, float(i)))
        guard(RouterStats(10 * i, layers))
    return (time.perf_counter() - start) / lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sets", type=int, default=10)
    args = parser.parse_args()
    env = {**os.environ, "MOE_TUI_DATA": os.environ.get("MOE_TUI_DATA", str(REPO / "data"))}
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        rates: dict[str, list[float]] = {"on": [], "off": []}
        for r in range(args.rounds):
            for guard in ("on", "off") if r % 2 == 0 else ("off", "on"):
                rates[guard].append(tokens_per_sec(runs, f"{guard}-{r}", args.steps, guard, env))
        lags, walls = set_latency(runs, args.sets, env)
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    per_line = guard_seconds_per_log_line()
    step = 2048 / off  # the cpu preset's tokens per step, at the unguarded speed
    direct = per_line / (10 * step)  # log lines every 10 steps
    result = {"guard_on_tokens_per_sec": round(on), "guard_off_tokens_per_sec": round(off),
              "guard_cost": round(1 - on / off, 4), "rounds": rates, "set_lag_steps": lags,
              "guard_seconds_per_log_line": per_line, "guard_share_of_training": direct,
              "set_command_seconds": [round(w, 2) for w in walls]}  # fmt: skip
    print(json.dumps(result))
    print(f"guard: {on:,.0f} tok/s on, {off:,.0f} off: {1 - on / off:+.1%} cost (median of {args.rounds} rounds)")
    print(f"guard, timed directly: {per_line * 1e6:.0f} us per log line, {direct:.3%} of the training time")
    print(f"set: the change lands {min(lags)}-{max(lags)} steps after the trainer's step when it was sent "
          f"(median {statistics.median(lags)}); `moe-tui set` takes {statistics.median(walls):.2f} s as a command")  # fmt: skip


if __name__ == "__main__":
    main()
