"""The trainer on real text: learning, exact resume, the control interface, failures, checkpoint safety."""

from __future__ import annotations

import json
import math
import os
import pickle
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

import moe_core.model.moe
from moe_core.config import build_config
from moe_core.data.batches import token_ids
from moe_core.data.corpus import load_corpus
from moe_core.data.vocab import Vocab
from moe_core.errors import UserError
from moe_core.events import CheckpointSaved, EvalMetrics, Notice, Sample, StateChanged, StepMetrics
from moe_core.model.sampling import SampleRequest
from moe_core.store.checkpoint import MANIFEST_FILE, STATE_FILE, file_digest, load_checkpoint
from moe_core.store.runs import Run
from moe_core.train.trainer import Trainer
from tests.conftest import TINY


def make_trainer(
    tmp_path: Path,
    shared_dir: Path,
    dataset: str = "simpsons",
    name: str = "run",
    resume: bool = False,
    sink=None,
    **overrides,
) -> Trainer:
    config = build_config(None, {}, {**TINY, "dataset": dataset, **overrides})
    corpus = load_corpus(dataset, shared_dir)
    vocab = Vocab.from_text(corpus.text)
    ids = token_ids(vocab, corpus.text)
    if resume:
        run = Run.open(tmp_path, name)
    else:
        run = Run.prepare(tmp_path, name, overwrite=False)
    trainer = Trainer.start(config, run, vocab, ids, on_event=sink, resume=resume)
    if not resume:
        run.initialise(config, vocab)
    return trainer


def unigram_entropy(text: str) -> float:
    counts = Counter(text)
    n = len(text)
    return -sum(c / n * math.log(c / n) for c in counts.values())


@pytest.mark.parametrize("dataset", ["shakespeare", "simpsons"])
def test_loss_falls_well_below_unigram_entropy(tmp_path, shared_dir, dataset):
    events = []
    trainer = make_trainer(
        tmp_path, shared_dir, dataset, sink=events.append, max_iters=300, sample_interval=1000, ckpt_interval=1000
    )
    assert trainer.run() == "finished"
    evals = [e for e in events if isinstance(e, EvalMetrics)]
    entropy = unigram_entropy(load_corpus(dataset, shared_dir).text)
    assert evals[-1].step == 300
    # Unigram entropy is what a model that ignores context reaches; a real LM must beat it clearly.
    assert evals[-1].val_loss < entropy - 0.6, (evals[-1], entropy)
    assert evals[-1].val_loss < evals[0].val_loss
    # metrics.jsonl: eval lines carry step, train and val loss, elapsed.
    lines = [json.loads(line) for line in trainer.run_folder.metrics_path.read_text().splitlines()]
    eval_lines = [r for r in lines if r["event"] == "EvalMetrics"]
    assert {"step", "train_loss", "val_loss", "elapsed", "val_bpc"} <= set(eval_lines[-1])
    assert eval_lines[-1]["val_loss"] == pytest.approx(evals[-1].val_loss)


def losses_by_step(events) -> dict[int, tuple[float, float]]:
    return {e.step: (e.loss, e.grad_norm) for e in events if isinstance(e, StepMetrics)}


def test_resume_gives_the_same_losses_as_a_straight_run(tmp_path, shared_dir):
    settings = dict(
        max_iters=60,
        eval_interval=30,
        ckpt_interval=30,
        sample_interval=30,
        router="noisy_topk",
        dropout=0.1,
        capacity_factor=1.0,
    )
    straight = []
    make_trainer(tmp_path, shared_dir, name="straight", sink=straight.append, **settings).run()

    first = []

    def stop_at_30(event):
        first.append(event)
        if isinstance(event, StepMetrics) and event.step == 30:
            trainer.control.stop("half way")

    trainer = make_trainer(tmp_path, shared_dir, name="split", sink=stop_at_30, **settings)
    assert trainer.run() == "stopped"
    assert trainer.step_num == 30
    second = []
    resumed = make_trainer(tmp_path, shared_dir, name="split", resume=True, sink=second.append, **settings)
    assert resumed.step_num == 30
    assert resumed.run() == "finished"

    a, b = losses_by_step(straight), {**losses_by_step(first), **losses_by_step(second)}
    assert sorted(a) == sorted(b) == list(range(10, 61, 10))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6), step
    evals_a = [(e.step, e.val_loss) for e in straight if isinstance(e, EvalMetrics)]
    evals_b = [(e.step, e.val_loss) for e in first + second if isinstance(e, EvalMetrics)]
    assert evals_a == pytest.approx(evals_b)


def test_control_interface_from_another_thread(tmp_path, shared_dir):
    events = []
    seen_steps = threading.Event()

    def sink(event):
        events.append(event)
        if isinstance(event, StepMetrics) and event.step >= 20:
            seen_steps.set()

    trainer = make_trainer(
        tmp_path,
        shared_dir,
        sink=sink,
        max_iters=10_000,
        ckpt_interval=10_000,
        eval_interval=10_000,
        sample_interval=10_000,
    )
    worker = threading.Thread(target=trainer.run, kwargs={"serve_after_finish": True})
    worker.start()
    try:
        assert seen_steps.wait(60)
        trainer.control.pause()
        _wait_for(lambda: trainer.state == "paused")
        paused_at = trainer.step_num
        trainer.control.sample(SampleRequest(prompt="Moe:", max_new_tokens=30, temperature=0.0))
        trainer.control.save()
        trainer.control.evaluate()
        _wait_for(lambda: any(isinstance(e, EvalMetrics) for e in events))
        assert trainer.step_num == paused_at  # nothing trains while paused, even while serving requests
        trainer.control.resume()
        _wait_for(lambda: trainer.step_num > paused_at + 5)
    finally:
        trainer.control.stop("test over")
        worker.join(60)
    assert not worker.is_alive()
    samples = [e for e in events if isinstance(e, Sample) and e.requested]
    assert samples and samples[0].text.startswith("Moe:") and len(samples[0].text) == 34
    saves = [e for e in events if isinstance(e, CheckpointSaved) and not e.best]
    assert saves[0].step == paused_at
    assert saves[-1].step == trainer.step_num  # stop() saved the final step
    states = [e.state for e in events if isinstance(e, StateChanged)]
    assert "paused" in states and states[-1] == "stopped"


def _wait_for(condition, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, shared_dir):
    events = []
    trainer = make_trainer(
        tmp_path, shared_dir, max_iters=100, ckpt_interval=20, eval_interval=1000, sample_interval=1000
    )

    take_snapshot = trainer.snapshot

    def snapshot_then_diverge(best, saved, rank_rng=None):
        # The checkpoint is written on another thread while training goes on: a NaN that appears
        # right after the snapshot must not reach the file.
        snapshot = take_snapshot(best, saved, rank_rng)
        if trainer.step_num == 20:
            with torch.no_grad():  # a real NaN in the weights, as a diverging run would produce
                trainer.model.lm_head.weight[0, 0] = float("nan")
        return snapshot

    trainer.snapshot = snapshot_then_diverge
    trainer.on_event = events.append
    assert trainer.run() == "error"
    errors = [e for e in events if isinstance(e, Notice) and e.level == "error"]
    assert errors and "non-finite at step 21" in errors[0].message and "step 20" in errors[0].message
    assert trainer.state == "error"
    assert [e.step for e in events if isinstance(e, CheckpointSaved)] == [20]
    folder = trainer.run_folder.checkpoint("latest")
    weights, state, _ = load_checkpoint(folder)
    assert state["step"] == 20 and all(torch.isfinite(w).all() for w in weights.values())
    # Resuming from the last good checkpoint, with a lower learning rate, trains on.
    resumed = make_trainer(
        tmp_path,
        shared_dir,
        resume=True,
        max_iters=40,
        lr=1e-3,
        ckpt_interval=20,
        eval_interval=1000,
        sample_interval=1000,
    )
    assert resumed.step_num == 20 and resumed.run() == "finished"


class Payload:
    """A pickle that, if ever unpickled, creates a file: proof of code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_with_a_pickled_object_is_refused(tmp_path, shared_dir):
    trainer = make_trainer(tmp_path, shared_dir, max_iters=10, ckpt_interval=10)
    trainer.run()
    folder = trainer.run_folder.checkpoint("latest")
    marker = tmp_path / "pwned"
    with open(folder / STATE_FILE, "wb") as f:
        pickle.dump({"step": Payload(marker)}, f)
    # An attacker can rewrite the manifest too: the refusal must not depend on it.
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["files"][STATE_FILE] = {
        "size": (folder / STATE_FILE).stat().st_size,
        "sha256": file_digest(folder / STATE_FILE),
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(folder)
    with pytest.raises(UserError, match="refused"):
        make_trainer(tmp_path, shared_dir, resume=True)
    assert not marker.exists()


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, shared_dir):
    trainer = make_trainer(tmp_path, shared_dir, max_iters=20, ckpt_interval=10)
    trainer.run()
    newest = trainer.run_folder.checkpoint("latest")
    assert newest.name == "step-00000020"
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(data))
    assert trainer.run_folder.checkpoint("latest").name == "step-00000010"
    assert make_trainer(tmp_path, shared_dir, resume=True).step_num == 10


def test_sampling_does_not_disturb_the_training_random_stream(tmp_path, shared_dir):
    a, b = [], []
    make_trainer(tmp_path, shared_dir, name="a", sink=a.append, max_iters=30, sample_interval=10).run()
    make_trainer(tmp_path, shared_dir, name="b", sink=b.append, max_iters=30, sample_interval=1000).run()
    assert losses_by_step(a) == losses_by_step(b)


def test_after_a_failure_save_and_eval_are_refused(tmp_path, shared_dir):
    events = []
    trainer = make_trainer(
        tmp_path,
        shared_dir,
        sink=events.append,
        max_iters=100,
        ckpt_interval=10,
        eval_interval=1000,
        sample_interval=1000,
    )

    def sink(event):
        events.append(event)
        if isinstance(event, CheckpointSaved) and event.step == 10:
            with torch.no_grad():
                trainer.model.lm_head.weight[0, 0] = float("nan")
        if isinstance(event, Notice) and event.level == "error":
            trainer.control.save()  # acted on after the failure, as a user's keypress would be
            trainer.control.evaluate()
            trainer.control.stop("done")

    trainer.on_event = sink
    assert trainer.run(serve_after_finish=True) == "stopped"
    refused = [e.message for e in events if isinstance(e, Notice) and e.level == "warning"]
    assert any(m.startswith("save refused") for m in refused)
    assert [e.step for e in events if isinstance(e, CheckpointSaved)] == [10]
    assert not any(isinstance(e, EvalMetrics) for e in events)


def test_pruning_keeps_a_set_aside_checkpoint_that_is_the_only_copy(tmp_path, shared_dir):
    trainer = make_trainer(tmp_path, shared_dir, max_iters=10, ckpt_interval=10)
    trainer.run()
    root = trainer.run_folder.checkpoints
    # A crash between "set the old best aside" and "rename the new one in" leaves only `.old-best-PID`.
    os.replace(root / "best", root / ".old-best-4242")
    trainer.save()
    assert (root / ".old-best-4242").is_dir(), "the only copy of best was deleted"
    trainer.save(best=True)
    trainer.save()
    assert not (root / ".old-best-4242").exists()  # best is whole again: the leftover can go


@pytest.mark.parametrize("experts_dtype", [torch.bfloat16, None], ids=["grouped-bf16", "per-expert-loop"])
def test_training_the_way_cuda_does_bf16_autocast(tmp_path, shared_dir, monkeypatch, experts_dtype):
    # Without a GPU, run CUDA's configuration on the CPU: matmuls under bf16 autocast with fp32
    # weights, with a noisy router, capacity and dropout; experts through the grouped matmul in
    # bf16 (what Hopper GPUs run) or the per-expert loop (older GPUs). bf16 expert rows meet fp32
    # gates and outputs in the dispatch.
    monkeypatch.setattr(moe_core.model.moe, "grouped_mm_dtype", lambda x, w: experts_dtype)
    events = []
    trainer = make_trainer(
        tmp_path,
        shared_dir,
        sink=events.append,
        max_iters=150,
        eval_interval=50,
        router="noisy_topk",
        capacity_factor=1.25,
        dropout=0.1,
        pos_encoding="rope",
        sample_interval=150,
        ckpt_interval=1000,
    )
    trainer.autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    assert trainer.run() == "finished"
    evals = [e for e in events if isinstance(e, EvalMetrics)]
    entropy = unigram_entropy(load_corpus("simpsons", shared_dir).text)
    assert evals[0].val_loss > evals[-1].val_loss and evals[-1].val_loss < entropy - 0.3, (evals, entropy)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    text = trainer.sample(SampleRequest(prompt="Homer:", max_new_tokens=30))
    assert text.startswith("Homer:") and len(text) == len("Homer:") + 30
