"""What probing costs on the `cpu` preset: routing a 2,000-character text, the validation loss with an
expert off beside the unchanged one (two samples included), and the importance table (every expert off
in turn), side by side with one evaluation of the trainer and one training step.

    python benchmarks/probe.py --steps 300 --repeats 5

Trains the `cpu` preset on each corpus for `--steps` steps (a real `moe-tui train --headless` process),
then times each probe in this process on its best checkpoint (median of `--repeats`, after one warm-up),
with the threads the CLI would use. Targets: probing 2,000 characters under 1 s, the importance table
under 10 s, on 2 cores. Prints one JSON line and a summary per corpus.
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

import torch

from moe_core.data.corpus import load_corpus
from moe_core.probe.ablate import val_loss
from moe_core.probe.request import Intervention, ProbeRequest
from moe_core.probe.source import SavedModel
from moe_core.store.runs import Run

REPO = Path(__file__).resolve().parents[1]
PROBED_CHARS = 2000


def train(runs: Path, corpus: str, steps: int, env: dict) -> Run:
    subprocess.run([sys.executable, "-m", "tui", "train", corpus, "--preset", "cpu", "--max-iters", str(steps),
                    "--eval-interval", str(steps // 2), "--run-name", corpus, "--headless", "--runs-dir", str(runs)],
                   env=env, cwd=REPO, check=True, capture_output=True)  # fmt: skip
    return Run.open(runs, corpus)


def timed(work, repeats: int) -> float:
    work()  # warm-up: the first call pays for one-off allocations
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure(run: Run, data_dir: Path, repeats: int) -> dict:
    saved = SavedModel.load(run, "best", data_dir)
    config = run.load_config()
    text = load_corpus(config.dataset, data_dir).text[-PROBED_CHARS:]  # from the validation split
    model = saved.model

    def one_training_step() -> None:  # forward and backward on one batch, as a step does (no optimizer)
        x, y = saved.evals.batches[0]
        model.train()
        model(x, y).loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    off = Intervention(masked=((0, 0),))
    return {
        "corpus": config.dataset,
        "route_2000_chars_s": timed(lambda: saved.probe(ProbeRequest(text=text)), repeats),
        "compare_one_expert_off_s": timed(lambda: saved.probe(ProbeRequest(intervention=off)), repeats),
        "importance_table_s": timed(lambda: saved.probe(ProbeRequest(experts=True)), max(1, repeats // 2)),
        "one_evaluation_s": timed(lambda: val_loss(model, saved.evals), repeats),
        "one_training_step_s": timed(one_training_step, repeats),
        "importance": saved.probe(ProbeRequest(experts=True)).importance,
        "val_loss": val_loss(model, saved.evals),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    data_dir = Path(os.environ.get("MOE_TUI_DATA", REPO / "data"))
    env = {**os.environ, "MOE_TUI_DATA": str(data_dir)}
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(train(Path(tmp), corpus, args.steps, env), data_dir, args.repeats)
                   for corpus in ("simpsons", "shakespeare")]  # fmt: skip
    for r in results:
        print(json.dumps(r))
    for r in results:
        print(f"{r['corpus']}: route {PROBED_CHARS} chars {r['route_2000_chars_s']:.3f} s (target < 1 s) · "
              f"one expert off, loss and samples beside the unchanged {r['compare_one_expert_off_s']:.2f} s · "
              f"importance table {r['importance_table_s']:.2f} s (target < 10 s) = "
              f"{r['importance_table_s'] / r['one_evaluation_s']:.1f} evaluations "
              f"({r['one_evaluation_s']:.3f} s each; a training step {r['one_training_step_s']:.3f} s)")  # fmt: skip
        print(f"  importance at val loss {r['val_loss']:.3f} (loss rise per expert, layer by layer):")
        for layer, row in enumerate(r["importance"]):
            print(f"    layer {layer + 1}: " + " ".join(f"e{e} {v:+.3f}" for e, v in enumerate(row)))


if __name__ == "__main__":
    main()
