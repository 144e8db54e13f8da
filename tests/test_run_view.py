"""A dashboard or viewer left on a long run stays small: what a RunView keeps of the events it is fed is
bounded, however long the run, and still spans the whole run."""

from __future__ import annotations

import gc
import math
import tracemalloc

from moe_core.events import (
    CheckpointSaved,
    EvalMetrics,
    LayerRouting,
    Notice,
    ResourceUsage,
    RouterStats,
    RunStarted,
    Sample,
    SettingsChanged,
    StepMetrics,
)
from tui.dashboard.run_view import LOG_LINES_KEPT, SAMPLES_KEPT, RunView

EVAL_EVERY, SAMPLE_EVERY, CHANGE_EVERY = 10, 500, 1000


def a_long_run(first: int, last: int):
    """What a trainer logging every step sends, from step `first` to `last`: a log line and the router's
    figures each step, an evaluation every 10, a sample and checkpoints every 500, a setting changed and
    a warning every 1000, the process's usage every 50."""
    for step in range(first, last + 1):
        loss = 1.5 + 2.5 * math.exp(-step / 5000)
        yield StepMetrics(step, loss, 0.01, 1e-4, 1e-3, 0.8, 25_000.0, step * 0.05)
        yield RouterStats(step, [LayerRouting([0.3, 0.2, 0.25, 0.25], 0.0, 1.35)] * 2)
        if step % EVAL_EVERY == 0:
            yield EvalMetrics(step, loss - 0.01, loss + 0.05, step * 0.05)
        if step % 50 == 0:
            yield ResourceUsage(step, 180.0, 300 << 20)
        if step % SAMPLE_EVERY == 0:
            yield Sample(step, "\n", f"\nsample at {step}", False, 0.8)
            yield CheckpointSaved(step, f"runs/long/checkpoints/step-{step:08d}", False, loss)
        if step % CHANGE_EVERY == 0:
            yield SettingsChanged(step, "lr", 1e-3, 1e-3 * 0.99, "moe-tui set")
            yield Notice("warning", f"slow step at {step}", step)


def fed(view: RunView, first: int, last: int) -> RunView:
    for event in a_long_run(first, last):
        view.apply(event)
    return view


def started(max_iters: int) -> RunView:
    view = RunView()
    view.apply(RunStarted("long", "shakespeare", "cpu", 300_000, 175_000, 0, max_iters, 512, 65, False))
    return view


def test_a_long_run_keeps_bounded_series_that_span_it_all():
    last = 60_000
    view = fed(started(last), 1, last)

    steps, values = view.train_loss.points()
    assert len(steps) <= view.train_loss.capacity < last
    # The whole run is on the chart: the first point and the last are means of the first and the last
    # few steps (as many as one stored point holds).
    merged = last / len(steps)
    assert steps[0] <= merged and steps[-1] >= last - merged
    assert values[0] > 3.5 and values[-1] < 1.6  # the curve's fall, from the start to the end
    assert steps == sorted(steps)

    for series in (view.eval_train, view.eval_val, view.eval_val_time):
        assert len(series) <= series.capacity < last // EVAL_EVERY
    evals, _ = view.eval_val.points()
    assert evals[0] <= last / len(evals) and evals[-1] >= last - last / len(evals)

    assert len(view.samples) == SAMPLES_KEPT and view.samples[0].step == last  # newest first
    assert len(view.log) == LOG_LINES_KEPT and view.log[0].step == last
    assert len(view.settings_steps) <= LOG_LINES_KEPT and view.settings_steps[-1] == last
    assert view.step == last and view.last_eval.step == last


def test_memory_does_not_grow_with_the_run():
    """Traced memory over 80,000 more steps peaks no higher than over the first 20,000, which filled
    every bounded history at least once: nothing is kept per event."""
    view = started(100_000)
    tracemalloc.start()
    try:
        fed(view, 1, 20_000)
        gc.collect()
        _, early_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        fed(view, 20_001, 100_000)
        gc.collect()
        now, late_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert view.step == 100_000
    # 64 KiB of slack: a thousandth of a KiB per step (the viewer grew by 0.6 KiB a step).
    assert late_peak <= early_peak + 64 * 1024, (early_peak, late_peak)
    assert now <= late_peak
