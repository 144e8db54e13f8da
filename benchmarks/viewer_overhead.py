"""What watching costs the trainer: its own tokens/s with 0, 1 and 3 `moe-tui watch` viewers attached.

    python benchmarks/viewer_overhead.py --seconds 20 --rounds 3

One detached trainer (the `cpu` preset on Simpsons, nothing scheduled but training) runs throughout.
The three settings take turns, round by round, each for `--seconds`; each viewer is a real
`moe-tui watch` in a tmux terminal of its own, drawing as a user would see it. The figure for a
setting is the median over rounds of the mean tokens/s the trainer itself logged inside each window
(the first log line of each window left out: it may straddle the change). Needs tmux. Prints one JSON line and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUIET = [
    "--max-iters",
    "1000000",
    "--eval-interval",
    "1000000",
    "--sample-interval",
    "1000000",
    "--ckpt-interval",
    "1000000",
    "--log-interval",
    "10",
]


def moe_tui(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tui", *args], env=env, capture_output=True, text=True, check=True)


SEEN: list[tuple[float, float]] = []  # (when first seen, tokens/s) of every StepMetrics line


def rates_between(start: float, end: float) -> list[float]:
    """tokens/s of the log lines that appeared in (start, end] (the file is polled every 50 ms)."""
    return [rate for seen, rate in SEEN if start < seen <= end]


def follow(metrics: Path, until: float, offset: int) -> int:
    """Note the StepMetrics lines that appear in metrics.jsonl until `until`; returns the new offset."""
    while time.monotonic() < until:
        with open(metrics, "rb") as f:
            f.seek(offset)
            data = f.read()
        whole = data[: data.rfind(b"\n") + 1]
        offset += len(whole)
        now = time.monotonic()
        for line in whole.splitlines():
            record = json.loads(line)
            if record.get("event") == "StepMetrics":
                SEEN.append((now, record["tokens_per_sec"]))
        time.sleep(0.05)
    return offset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="cpu")
    args = parser.parse_args()
    if shutil.which("tmux") is None:
        sys.exit("viewer_overhead needs tmux (apt-get install tmux)")
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MOE_TUI_RUNS": tmp, "PYTHONUNBUFFERED": "1"}
        out = moe_tui(
            "train", "simpsons", "--preset", args.preset, "--run-name", "bench", "--detach", *QUIET, env=env
        ).stdout
        pid = int(out.split("as process ")[1].split(";")[0])
        metrics = Path(tmp) / "bench" / "metrics.jsonl"
        windows: dict[int, list[tuple[float, float]]] = {0: [], 1: [], 3: []}
        offset = follow(metrics, time.monotonic() + args.seconds, 0)  # warm-up, not counted
        try:
            for round_ in range(args.rounds):
                for viewers in (0, 1, 3):
                    # A tmux server per phase: starting one on a socket whose server is still going away fails.
                    tmux = ["tmux", "-L", f"viewer-overhead-{os.getpid()}-{round_}-{viewers}"]
                    for i in range(viewers):
                        subprocess.run(
                            [
                                *tmux,
                                "new-session",
                                "-d",
                                "-s",
                                f"v{i}",
                                "-x",
                                "100",
                                "-y",
                                "30",
                                f"{sys.executable} -m tui watch bench",
                            ],
                            env=env,
                            check=True,
                        )
                    start = time.monotonic()
                    offset = follow(metrics, start + args.seconds, offset)
                    windows[viewers].append((start, time.monotonic()))
                    subprocess.run([*tmux, "kill-server"], capture_output=True)
        finally:
            os.kill(pid, signal.SIGTERM)
    result, per_window = {}, {}
    for viewers, spans in windows.items():
        means = [statistics.mean(rates[1:] or rates) for start, end in spans if (rates := rates_between(start, end))]
        per_window[str(viewers)] = [round(m) for m in means]
        result[viewers] = statistics.median(means)
    base = result[0]
    print(
        json.dumps(
            {
                "preset": args.preset,
                "seconds": args.seconds,
                "rounds": args.rounds,
                "tokens_per_sec": {str(k): round(v, 1) for k, v in result.items()},
                "per_window": per_window,
            }
        )
    )
    print("| viewers | trainer tokens/s | vs none |\n|---|---|---|")
    for viewers, rate in result.items():
        print(f"| {viewers} | {rate:,.0f} | {rate / base - 1:+.1%} |")


if __name__ == "__main__":
    main()
