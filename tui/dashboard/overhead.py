"""What watching costs: the trainer's own tokens/s with the dashboard up (driven headlessly by
Textual's test pilot) vs with the plain reporter. Same config, a fresh run each time, the two front
ends alternated round by round, the median of each reported."""

from __future__ import annotations

import asyncio
import io
import statistics
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

import torch

from moe_core.config import Config
from moe_core.data.batches import token_ids
from moe_core.data.corpus import default_data_dir, load_corpus
from moe_core.data.vocab import Vocab
from moe_core.events import State
from moe_core.store.runs import Run
from moe_core.train.trainer import Trainer
from tui.dashboard.app import Dashboard
from tui.dashboard.sources import reserve_torch_threads
from tui.headless import HeadlessReporter

ROUNDS = 3  # of each front end, alternated


def dashboard_overhead(config: Config, steps: int = 60, rounds: int = ROUNDS) -> tuple[float, float]:
    """(tokens/s with the plain reporter, tokens/s with the dashboard), each the median over rounds.

    Both front ends train on a fresh worker thread while this thread keeps one torch thread, as
    `moe-tui train` does under the dashboard (`reserve_torch_threads`): run before any other torch
    work in the process, the plain reporter's figure is then what it gets on the main thread.
    """
    threads = reserve_torch_threads()
    try:
        corpus = load_corpus(config.dataset, default_data_dir())
        vocab = Vocab.from_text(corpus.text)
        ids = token_ids(vocab, corpus.text)
        # Only training steps: no periodic eval, sample or checkpoint, and a minimal final one.
        quiet = replace(
            config,
            max_iters=steps,
            log_interval=5,
            eval_interval=10**9,
            eval_iters=1,
            sample_interval=10**9,
            sample_tokens=0,
            ckpt_interval=10**9,
        )
        plain, dashboard = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for round_ in range(rounds):
                for front_end, results in (("plain", plain), ("dashboard", dashboard)):
                    run = Run.prepare(Path(tmp), f"{front_end}-{round_}", overwrite=False)
                    trainer = Trainer(quiet, run, vocab, ids)
                    run.initialise(quiet, vocab)
                    if front_end == "plain":
                        trainer.on_event = HeadlessReporter(io.StringIO(), progress=False)
                        worker = threading.Thread(target=_train_plain, args=(trainer, threads))
                        worker.start()
                        worker.join()
                    else:
                        asyncio.run(_train_under_the_dashboard(trainer, threads))
                    results.append(_steady_tokens_per_sec(run))
    finally:
        torch.set_num_threads(threads)
    return statistics.median(plain), statistics.median(dashboard)


def _train_plain(trainer: Trainer, threads: int) -> None:
    torch.set_num_threads(threads)
    trainer.run()


async def _train_under_the_dashboard(trainer: Trainer, threads: int) -> None:
    app = Dashboard(trainer, torch_threads=threads)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()  # the screen is up
        while trainer.state != State.FINISHED:
            await asyncio.sleep(0.25)  # not pilot.pause(), which forces a screen update of its own


def _steady_tokens_per_sec(run: Run) -> float:
    """Mean of the logged tokens/s, leaving out the first log window (warm-up)."""
    rates = [r["tokens_per_sec"] for r in run.read_metrics() if r.get("event") == "StepMetrics"]
    return statistics.mean(rates[1:] or rates)
