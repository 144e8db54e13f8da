"""How long `moe-tui` takes to answer commands that neither train nor sample, beside Python alone and
Python importing torch; and to start training: a tiny run of 5 steps, start-up all but the whole of it.

    python benchmarks/cli_startup.py                          # this checkout
    python benchmarks/cli_startup.py --repo /tmp/other-tree   # another checkout, same interpreter

Each command runs as `python -m tui ...` in a fresh process (what the `moe-tui` script does, plus runpy),
with the checkout given first on PYTHONPATH; the figure is the median wall time of `--repeats` runs, with
the fastest and slowest. `runs` and `stop` read a runs folder holding one tiny run, trained first by
the checkout itself (or `--runs-dir`); the training case writes its run in a folder of its own. Then
`python -X importtime` of `moe-tui --help`: the imports that cost the most, cumulative.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY_RUN = [
    "train",
    "shakespeare",
    *("--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16"),
    *("--num-experts", "2", "--top-k", "1", "--batch-size", "8", "--max-iters", "5"),
    *("--eval-interval", "5", "--eval-iters", "1", "--sample-tokens", "0", "--device", "cpu"),
    "--headless",
]


def wall_times(command: list[str], env: dict, cwd: Path, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - started)
    return times


def top_imports(python: str, args: list[str], env: dict, cwd: Path, count: int) -> list[tuple[float, str]]:
    """(cumulative seconds, module) of the costliest imports of `python -m tui ARGS`, of the first two
    levels (what the command imports, and what those import), the second indented."""
    err = subprocess.run(
        [python, "-X", "importtime", "-m", "tui", *args], env=env, cwd=cwd, capture_output=True, text=True
    ).stderr
    found = []
    for line in err.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:") :].split("|")
        depth = (len(name) - len(name.lstrip()) - 1) // 2  # two spaces of indent per level
        if depth <= 1:
            found.append((int(cumulative) / 1e6, "  " * depth + name.strip()))
    return sorted(found, reverse=True)[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--runs-dir", type=Path, help="a runs folder to list [default: one tiny run, trained here]")
    parser.add_argument("--top", type=int, default=12, help="import-time entries shown")
    args = parser.parse_args()
    repo = args.repo.resolve()
    env = {**os.environ, "PYTHONPATH": str(repo)}
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = args.runs_dir or Path(tmp)
        env["MOE_TUI_RUNS"] = str(runs_dir)
        if args.runs_dir is None:
            subprocess.run(
                [args.python, "-m", "tui", *TINY_RUN, "--run-name", "tiny"],
                env=env,
                cwd=repo,
                check=True,
                capture_output=True,
            )
        run = next((p.name for p in sorted(runs_dir.iterdir()) if p.is_dir()), "tiny")
        here = {**env, "MOE_TUI_RUNS": tmp}  # the training case writes a run: never in --runs-dir
        cases = {
            "python -c pass": (["-c", "pass"], env),
            "python -c 'import torch'": (["-c", "import torch"], env),
            "moe-tui --help": (["-m", "tui", "--help"], env),
            "moe-tui runs": (["-m", "tui", "runs"], env),
            "moe-tui datasets": (["-m", "tui", "datasets"], env),
            f"moe-tui stop {run} (not running)": (["-m", "tui", "stop", run], env),
            "moe-tui train (5 tiny steps)": (["-m", "tui", *TINY_RUN, "--run-name", "again", "--overwrite"], here),
        }
        print(f"{repo}, {args.python}, median of {args.repeats} (fastest - slowest)")
        for label, (command, case_env) in cases.items():
            times = wall_times([args.python, *command], case_env, repo, args.repeats)
            print(f"  {label:<40} {statistics.median(times):6.3f} s  ({min(times):.3f} - {max(times):.3f})")
        print("python -X importtime -m tui --help, costliest imports, two levels deep (cumulative):")
        for seconds, name in top_imports(args.python, ["--help"], env, repo, args.top):
            print(f"  {seconds:6.3f} s  {name}")


if __name__ == "__main__":
    main()
