"""The dashboard: pilot tests on a tiny real trainer, layout snapshots from a recorded event stream.

The snapshots replay `fixtures/dashboard_events.jsonl` (300 steps of a TINY simpsons run, recorded with
`python -m tests.test_dashboard --record`), so they never depend on timing. Update them after a
deliberate layout change with `pytest tests/test_dashboard.py --snapshot-update`; they live in
tests/snapshots/.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import os
import random
import subprocess
import sys
import time
import weakref
from importlib.metadata import version
from pathlib import Path

import pytest
import safetensors.torch
import torch
from textual.app import App
from textual.filter import dim_color
from textual.widgets import Input
from textual.widgets._footer import FooterKey

from moe_core.bus import EventBus
from moe_core.config import build_config
from moe_core.events import Alert, CheckpointSaved, Notice, StateChanged, StepMetrics, from_record, to_record
from moe_core.model.dropout import Dropout
from moe_core.probe.request import ProbeRequest
from moe_core.train.trainer import Trainer
from tests.conftest import QUIET, TINY
from tests.test_training import make_trainer
from tui.dashboard import overhead
from tui.dashboard.app import Dashboard
from tui.dashboard.history import SeriesBuffer, bucket_means
from tui.dashboard.overhead import dashboard_overhead
from tui.dashboard.screens import ConfirmQuit, SettingsDialog
from tui.dashboard.sources import reserve_torch_threads
from tui.dashboard.widgets.panels import SamplesPanel
from tui.dashboard.widgets.status import StatusBar
from tui.headless import HeadlessReporter

FIXTURE = Path(__file__).parent / "fixtures" / "dashboard_events.jsonl"
SIZE = (100, 30)
# Nothing scheduled: each test asks for what it checks.


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # The UI loop and the trainer share 2 cores (and other tests may run beside these).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def plain_terminal(monkeypatch):
    """Draw as on a terminal the user has not configured, whatever the shell running pytest has set.
    Textual reads NO_COLOR when an app starts, but TEXTUAL_THEME and TEXTUAL_DIM_FACTOR when it is first
    imported (by the snapshot plugin, before any test module): those are put back to Textual's defaults."""
    for name in [name for name in os.environ if name in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(App.theme, "_default", "textual-dark")
    monkeypatch.setattr(dim_color.__wrapped__, "__defaults__", (0.66,))
    dim_color.cache_clear()  # colours dimmed by another factor
    yield
    dim_color.cache_clear()


@pytest.fixture
def fast_keys(monkeypatch):
    """Pilot waits after each key until the process is idle, for up to a second per wait; with a
    trainer busy on another thread it never is, so a key would cost 2 s. A short fixed wait instead."""
    import textual.app

    async def short_wait(*args, **kwargs) -> None:
        await asyncio.sleep(0.02)

    monkeypatch.setattr(textual.app, "wait_for_idle", short_wait)


def drive(scenario) -> None:
    asyncio.run(scenario())


async def wait_until(pilot, condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the dashboard"
        await pilot.pause(0.05)


async def answered_a_probe(pilot, app, trainer) -> None:
    """A probe sent now is answered: the training loop has gone round and taken every command before it."""
    asked = random.getrandbits(31)
    trainer.control.probe(ProbeRequest(text="a", request_id=asked))
    await wait_until(pilot, lambda: asked in app.view.answers)


def shown(widget) -> str:
    """The text a Static-based panel shows now."""
    return str(widget.content if hasattr(widget, "content") else widget.body.content)


def status_text(app: Dashboard) -> str:
    return str(app.query_one(StatusBar).render())


# -- pilot tests on a real trainer ---------------------------------------------------------------


def test_steps_advance_and_space_pauses_within_one_step(tmp_path, shared_dir, fast_keys):
    trainer = make_trainer(tmp_path, shared_dir, **QUIET)
    pressed_at, held = [], []
    pause = trainer.control.pause
    trainer.control.pause = lambda: held.append(pause)  # held back until the screen has shown the key

    def send_the_held_pause():
        pressed_at.append(trainer.step_num)
        held.pop()()

    async def scenario():
        app = Dashboard(trainer, resume_hint="moe-tui train --resume run")
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.view.step >= 10)
            assert "RUNNING" in status_text(app) and f"step {app.view.step}/100000" in status_text(app)
            await pilot.press("space")
            # The key shows by itself, before the trainer can answer: its command has not reached it yet.
            await wait_until(pilot, lambda: "pausing…" in status_text(app))
            assert "RUNNING" in status_text(app) and held
            send_the_held_pause()
            await wait_until(pilot, lambda: "PAUSED" in status_text(app))
            assert app.active_bindings["space"].binding.description == "Resume"
            paused_at = trainer.step_num
            assert paused_at - pressed_at[0] <= 1
            await answered_a_probe(pilot, app, trainer)  # the paused loop went round, and took no step
            assert trainer.step_num == paused_at
            await pilot.press("space")
            await wait_until(pilot, lambda: app.view.step >= paused_at + 10)
            assert "RUNNING" in status_text(app)

    drive(scenario)


def test_a_rule_tripping_again_and_again_rings_once_and_every_alert_is_listed(tmp_path, shared_dir, fast_keys):
    # A slow machine can trip slow_step again and again: each alert is a line in the events panel, but
    # the bell, desktop notification and toast come once per rule in RING_SECONDS.
    trainer = make_trainer(tmp_path, shared_dir, **QUIET)
    rings = []

    async def scenario():
        app = Dashboard(trainer, resume_hint="moe-tui train --resume run")
        app.notify = lambda message, **kw: rings.append((kw["title"], message))
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.view.step >= 5)
            for n, rule in enumerate(["slow_step"] * 3 + ["loss_spike"] + ["slow_step"] * 3):
                trainer.control.alert(Alert(trainer.step_num, rule, f"alert {n}", "warn", trainer.step_num))
                await wait_until(pilot, lambda: app.view.alerts_seen == n + 1)  # one drain each
            assert rings == [("guard: slow_step", "alert 0"), ("guard: loss_spike", "alert 3")]
            listed = [line.text for line in app.view.log if line.text.startswith("guard")]
            assert len(listed) == 7 and all(f"alert {n}" in " ".join(listed) for n in range(7))

    drive(scenario)


def test_sample_dialog_puts_text_that_starts_with_the_prompt_in_the_samples_panel(tmp_path, shared_dir, fast_keys):
    trainer = make_trainer(tmp_path, shared_dir, **QUIET)

    async def scenario():
        app = Dashboard(trainer)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.view.step >= 5)
            await pilot.press("s")
            prompt = app.screen.query_one("#prompt")
            prompt.value = "Moe€"  # a character the model does not know: refused in the dialog
            await pilot.press("enter")
            await wait_until(pilot, lambda: "does not know" in str(app.screen.query_one("#sample-error").content))
            await pilot.press("end", "ctrl+u", *"Moe:", "tab", "end", "ctrl+u", "3", "0", "enter")
            await wait_until(pilot, lambda: any(s.requested for s in app.view.samples))
            sample = next(s for s in app.view.samples if s.requested)
            assert sample.text.startswith("Moe:") and len(sample.text) == 4 + 30
            await wait_until(pilot, lambda: sample.text.strip() in shown(app.query_one(SamplesPanel)))
            assert "yours" in shown(app.query_one(SamplesPanel))
            assert app.view.state == "running"  # sampling while training, and training went on

    drive(scenario)
    assert "Moe:" in trainer.run_folder.samples_path.read_text()  # the trainer logged it to the run


def test_c_writes_a_checkpoint_and_q_saves_and_exits(tmp_path, shared_dir, fast_keys):
    trainer = make_trainer(tmp_path, shared_dir, **QUIET)

    async def scenario():
        app = Dashboard(trainer, resume_hint="moe-tui train --resume run")
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.view.step >= 5)
            await pilot.press("c")
            await wait_until(pilot, lambda: any(line.level == "checkpoint" for line in app.view.log))
            saved = next(line for line in app.view.log if line.level == "checkpoint")
            assert (trainer.run_folder.checkpoints / f"step-{saved.step:08d}" / "model.safetensors").is_file()
            await pilot.press("q")
            assert "moe-tui train --resume run" in str(app.screen.query_one("#confirm-message").content)
            await pilot.press("y")
            await wait_until(pilot, lambda: app.return_code is not None)
        return app

    app = asyncio.run(scenario())
    assert app.return_code == 0 and trainer.state == "stopped"
    last = trainer.run_folder.checkpoint("latest")
    assert last.name == f"step-{trainer.step_num:08d}"  # the final step was saved on the way out


def test_ctrl_q_asks_as_q_does_and_the_trainer_saves_before_the_exit(tmp_path, shared_dir, fast_keys):
    """Textual's own quit key must not leave the trainer running behind a closed screen."""
    trainer = make_trainer(tmp_path, shared_dir, **QUIET)

    async def scenario():
        app = Dashboard(trainer, resume_hint="moe-tui train --resume run")
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.view.step >= 3)
            await pilot.press("ctrl+q")
            await wait_until(pilot, lambda: isinstance(app.screen, ConfirmQuit))
            await pilot.press("n")
            await wait_until(pilot, lambda: not isinstance(app.screen, ConfirmQuit))
            assert app.return_code is None and app.local.live  # asked, declined: training goes on
            await pilot.press("ctrl+q")
            await wait_until(pilot, lambda: isinstance(app.screen, ConfirmQuit))
            await pilot.press("y")
            await wait_until(pilot, lambda: app.return_code is not None)
        return app

    assert asyncio.run(scenario()).return_code == 0
    assert trainer.state == "stopped" and not trainer.unsaved


def test_o_changes_settings_between_two_steps_and_the_chart_marks_where(tmp_path, shared_dir, fast_keys):
    trainer = make_trainer(tmp_path, shared_dir, **QUIET)

    async def scenario():
        app = Dashboard(trainer)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.view.step >= 3)
            await pilot.press("o")
            await wait_until(pilot, lambda: isinstance(app.screen, SettingsDialog))
            assert "lr=0.003" in str(app.screen.query_one("#settings-now").content)
            await pilot.press(*"n_layer=3", "enter")  # a shape: refused in the dialog, nothing sent
            assert "n_layer cannot change" in str(app.screen.query_one("#settings-error").content)
            app.screen.query_one("#settings", Input).value = "lr=0.001 dropout=0.1"
            await pilot.press("enter")
            await wait_until(pilot, lambda: len(app.view.settings_steps) == 2)
            changed = [line.text for line in app.view.log if line.level == "setting"]
            assert changed == ["dropout 0 → 0.1 (dashboard)", "lr 0.003 → 0.001 (dashboard)"]
            await pilot.press("ctrl+c")
            await wait_until(pilot, lambda: app.return_code is not None)

    asyncio.run(scenario())
    assert trainer.config.lr == 0.001 and trainer.config.dropout == 0.1
    assert all(m.p == 0.1 for m in trainer.model.modules() if isinstance(m, Dropout))
    assert "lr = 0.001" in trainer.run_folder.config_path.read_text()


def test_f_while_paused_forks_here_in_the_background_and_says_how_to_watch_it(
    tmp_path, shared_dir, fast_keys, monkeypatch
):
    monkeypatch.setenv("MOE_TUI_DATA", str(shared_dir))
    trainer = make_trainer(tmp_path, shared_dir, **QUIET)

    async def scenario():
        app = Dashboard(trainer)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.view.step >= 3)
            await pilot.press("space")
            await wait_until(pilot, lambda: app.view.state == "paused")
            paused_at = trainer.step_num
            await pilot.press("f")
            await wait_until(pilot, lambda: isinstance(app.screen, SettingsDialog))
            app.screen.query_one("#settings", Input).value = "lr=0.001"
            await pilot.press("enter")
            await wait_until(pilot, lambda: any("moe-tui watch" in line.text or line.level == "error"
                                                for line in app.view.log), timeout=120)  # fmt: skip
            said = next(line.text for line in app.view.log if line.level in ("info", "error") and "fork" in line.text)
            await pilot.press("ctrl+c")
            await wait_until(pilot, lambda: app.return_code is not None)
        return paused_at, said

    paused_at, said = asyncio.run(scenario())
    assert said.startswith(f"training run 'run-fork{paused_at}' in the background"), said
    fork = tmp_path / f"run-fork{paused_at}"
    assert json.loads((fork / "fork.json").read_text())["changed"] == {"lr": [0.003, 0.001]}
    stopped = subprocess.run([sys.executable, "-m", "tui", "stop", fork.name, "--runs-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert stopped.returncode == 0, stopped.stderr


def test_ctrl_c_saves_and_exits_130_without_asking(tmp_path, shared_dir, fast_keys):
    trainer = make_trainer(tmp_path, shared_dir, **QUIET)

    async def scenario():
        app = Dashboard(trainer)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.view.step >= 3)
            await pilot.press("ctrl+c")
            await wait_until(pilot, lambda: app.return_code is not None)
        return app

    assert asyncio.run(scenario()).return_code == 130
    assert trainer.run_folder.checkpoint("latest").name == f"step-{trainer.step_num:08d}"


def test_a_resumed_run_shows_its_whole_history(tmp_path, shared_dir, fast_keys):
    make_trainer(tmp_path, shared_dir, **{**QUIET, "max_iters": 30, "ckpt_interval": 30}).run()
    trainer = make_trainer(tmp_path, shared_dir, resume=True, **{**QUIET, "max_iters": 40})

    async def scenario():
        app = Dashboard(trainer, replay=trainer.run_folder.events())
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.view.step >= 40)
            steps, _ = app.view.train_loss.points()
            assert steps[0] == 5 and steps[-1] == 40  # the first session's steps, then this one's

    drive(scenario)


def test_finished_run_stays_up_and_still_samples(tmp_path, shared_dir, fast_keys):
    trainer = make_trainer(tmp_path, shared_dir, **{**QUIET, "max_iters": 20, "eval_iters": 2, "sample_tokens": 0})

    async def scenario():
        app = Dashboard(trainer)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.view.state == "finished")
            assert "FINISHED" in status_text(app) and "step 20/20" in status_text(app)
            assert "ETA" not in status_text(app)
            await pilot.press("s", "tab", "end", "ctrl+u", "1", "0", "enter")
            await wait_until(pilot, lambda: any(s.requested for s in app.view.samples))
            assert app.view.state == "finished" and trainer.step_num == 20

    drive(scenario)


def test_a_failing_save_shows_a_warning_and_training_goes_on(tmp_path, shared_dir, fast_keys, monkeypatch):
    trainer = make_trainer(tmp_path, shared_dir, **QUIET)

    def save_file_on_a_full_disk(tensors, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(safetensors.torch, "save_file", save_file_on_a_full_disk)  # what save_checkpoint calls

    async def scenario():
        app = Dashboard(trainer)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.view.step >= 3)
            await pilot.press("c")
            await wait_until(pilot, lambda: any(line.level == "warning" for line in app.view.log))
            warning = next(line for line in app.view.log if line.level == "warning")
            assert "could not save a checkpoint" in warning.text and "No space left on device" in warning.text
            failed_at = warning.step
            await wait_until(pilot, lambda: app.view.step >= failed_at + 10)  # training went on
            assert app.view.state == "running"
            await pilot.press("ctrl+c")
            await wait_until(pilot, lambda: app.return_code is not None)

    drive(scenario)
    assert not any(trainer.run_folder.checkpoints.iterdir())  # nothing half-written left behind


def test_the_trainer_thread_takes_the_torch_threads_the_ui_thread_gave_up(tmp_path, shared_dir, fast_keys):
    # The UI thread keeps one torch thread, so OpenMP manages no more threads than there are cores
    # (see reserve_torch_threads); the trainer's thread sets the count the UI thread had.
    torch.set_num_threads(2)
    threads = reserve_torch_threads()
    assert (threads, torch.get_num_threads()) == (2, 1)
    trainer = make_trainer(tmp_path, shared_dir, **{**QUIET, "max_iters": 5, "eval_iters": 1, "sample_tokens": 0})
    seen = []
    run = trainer.run
    trainer.run = lambda **kwargs: seen.append(torch.get_num_threads()) or run(**kwargs)

    async def scenario():
        app = Dashboard(trainer, torch_threads=threads)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.view.state == "finished")

    drive(scenario)
    assert seen == [2]
    assert torch.get_num_threads() == 1  # this thread's own count is untouched by the trainer's


def test_bench_measures_training_under_both_front_ends(shared_dir, monkeypatch):
    monkeypatch.setenv("MOE_TUI_DATA", str(shared_dir))
    config = build_config(None, {}, {**TINY, "dataset": "simpsons"})
    # What consumed each run's events and the tokens/s each logged (as it emitted them: the dashboard's
    # trainer thread may end after the runs' temporary folder is gone), and the dashboards made: watched,
    # not changed.
    consumer, logged, dashboards = {}, {}, []
    run, emit = Trainer.run, Trainer.emit

    def run_and_record(self, **kwargs):
        consumer[self.run_folder.name] = self.on_event
        return run(self, **kwargs)

    def emit_and_record(self, event):
        if isinstance(event, StepMetrics):
            logged.setdefault(self.run_folder.name, []).append(event.tokens_per_sec)
        emit(self, event)

    def dashboard(*args, **kwargs):
        dashboards.append(Dashboard(*args, **kwargs))
        return dashboards[-1]

    monkeypatch.setattr(Trainer, "run", run_and_record)
    monkeypatch.setattr(Trainer, "emit", emit_and_record)
    monkeypatch.setattr(overhead, "Dashboard", dashboard)

    plain, watched = dashboard_overhead(config, steps=20, rounds=1)
    assert len(consumer) == 2  # two runs, one under each front end
    (plain_run,) = [name for name, on_event in consumer.items() if isinstance(on_event, HeadlessReporter)]
    (watched_run,) = [name for name in consumer if name != plain_run]
    (app,) = dashboards
    assert consumer[watched_run] is app.local.bus and app.trainer.run_folder.name == watched_run
    assert app.view.run.run_name == watched_run and app.view.step > 0  # and it showed that run's steps
    # Each figure is its own run's logged tokens/s: 20 steps logged every 5, the first window left out.
    assert len(logged[plain_run]) == len(logged[watched_run]) == 4
    assert plain == pytest.approx(sum(logged[plain_run][1:]) / 3)
    assert watched == pytest.approx(sum(logged[watched_run][1:]) / 3)


def test_nan_in_training_shows_an_error_and_training_stops(tmp_path, shared_dir, fast_keys):
    trainer = make_trainer(tmp_path, shared_dir, **{**QUIET, "ckpt_interval": 20})

    def poison(event):
        if isinstance(event, CheckpointSaved) and event.step == 20:
            with torch.no_grad():  # a real NaN in the weights, as a diverging run would produce
                trainer.model.lm_head.weight[0, 0] = float("nan")

    async def scenario():
        bus = EventBus()
        bus.subscribe(poison)  # on the trainer thread, before the dashboard hears of the event
        app = Dashboard(trainer, bus=bus)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.view.state == "error")
            banner = str(app.query_one("#error-banner").content)
            assert app.query_one("#error-banner").display
            assert "non-finite" in banner and "step 20" in banner
            assert "ERROR" in status_text(app)
            stopped_at = trainer.step_num
            await pilot.press("c", "space")  # neither saves the broken weights nor restarts training
            await answered_a_probe(pilot, app, trainer)  # whatever the keys sent, the loop has had it since
            assert trainer.step_num == stopped_at
            assert [line.step for line in app.view.log if line.level == "checkpoint"] == [20]

    drive(scenario)
    assert trainer.run_folder.checkpoint("latest").name == "step-00000020"


# -- layout snapshots from a recorded stream -----------------------------------------------------


# Snapshots are pictures of Textual's output: another Textual version may draw a border or the
# Footer a little differently, which is not a regression of ours.
SNAPSHOT_TEXTUAL = "8.2.8"
same_textual = pytest.mark.skipif(
    version("textual") != SNAPSHOT_TEXTUAL, reason=f"snapshots were drawn with Textual {SNAPSHOT_TEXTUAL}"
)


def recorded_events() -> list:
    return [from_record(json.loads(line)) for line in FIXTURE.read_text().splitlines()]


@pytest.fixture
def snapshot(snapshot):
    """Keep snapshot files in tests/snapshots/ rather than syrupy's __snapshots__."""
    from pytest_textual_snapshot import SVGImageExtension

    class InSnapshotsFolder(SVGImageExtension):
        @classmethod
        def dirname(cls, *, test_location) -> str:
            return str(Path(test_location.filepath).parent / "snapshots" / test_location.basename)

    original = snapshot.use_extension
    snapshot.use_extension = lambda extension_class=None: original(InSnapshotsFolder)
    return snapshot


def test_every_stored_layout_belongs_to_a_test_here():
    # Syrupy finds stored snapshots that no test uses only in a run of one process, not under xdist:
    # a layout test renamed or removed would leave its picture behind, unnoticed.
    stored = sorted(Path(__file__).parent.joinpath("snapshots", "test_dashboard").glob("*.svg"))
    tests = {name for name, value in globals().items() if name.startswith("test_") and callable(value)}
    assert stored and [p.name for p in stored if p.stem.split("[")[0] not in tests] == []


@same_textual
@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_layout(snap_compare, size):
    assert snap_compare(Dashboard(replay=recorded_events()), terminal_size=size)


@same_textual
def test_layout_log_y_recent_window(snap_compare):
    assert snap_compare(Dashboard(replay=recorded_events()), press=["l", "w"], terminal_size=(100, 30))


@same_textual
def test_layout_error(snap_compare):
    message = "loss or gradient norm became non-finite at step 301"
    events = recorded_events() + [
        StateChanged("error", message),
        Notice(
            "error",
            f"{message}. Training stopped; the last good checkpoint (step 300) is kept; resume with a lower --lr",
            300,
        ),
    ]
    assert snap_compare(Dashboard(replay=events), terminal_size=(80, 24))


# -- the chart's cost does not grow with the run -------------------------------------------------


def test_the_footer_keeps_no_key_it_no_longer_shows():
    # Each state change refreshes the bindings (in a live run an evaluation greys Save and Eval out), and
    # each refresh rebuilds the Footer's keys. Textual's kept every key it replaced: a viewer grew by
    # megabytes an hour. Only this app's keys are followed (weakly): other tests' apps may linger.
    async def scenario():
        app = Dashboard(replay=recorded_events())
        keys: weakref.WeakSet[FooterKey] = weakref.WeakSet()
        made = 0
        async with app.run_test(size=(100, 30)) as pilot:
            for i in range(50):  # 20 state changes, then until the last rebuild is done
                if i < 20:
                    app.view.apply(StateChanged("evaluating" if i % 2 else "running"))
                    app.dashboard.refresh_panels()
                await pilot.pause()
                shown = set(app.query(FooterKey))
                made += len(shown - set(keys))
                keys.update(shown)
                if i >= 20:  # collecting is slow in a worker that holds other tests' objects: only at the end
                    gc.collect()
                    if set(keys) == shown:
                        break
            assert made > 10 * len(shown) > 0  # the keys were rebuilt, again and again
            assert set(keys) == shown, (len(keys), len(shown))  # and only those on screen are alive

    drive(scenario)


def test_series_buffer_is_bounded_and_keeps_the_shape():
    buffer = SeriesBuffer(capacity=64)
    for step in range(1, 100_001):
        buffer.append(step, 1000.0 / step)
    steps, values = buffer.points()
    assert len(steps) <= 64 and steps == sorted(steps)
    assert steps[0] < 2000 and steps[-1] > 98_000  # still the whole run
    gaps = [b - a for a, b in zip(steps, steps[1:-1])]
    assert max(gaps) == min(gaps)  # evenly spaced: merged pairs, never thinned at random
    assert bucket_means(steps, values, 10)[1] == sorted(bucket_means(steps, values, 10)[1], reverse=True)


def record(path: Path = FIXTURE) -> None:
    """Re-record the snapshot stream: 300 steps of a TINY simpsons run (batches of 32) with one requested sample."""
    import tempfile

    from moe_core.model.sampling import SampleRequest
    from tests.conftest import shared_data_dir

    events = []

    def sink(event):
        events.append(event)
        if isinstance(event, StepMetrics) and event.step == 220:
            trainer.control.sample(SampleRequest("Homer Simpson:", 120, temperature=0.7, top_k=20))
        if isinstance(event, StepMetrics) and event.step == 300:
            trainer.control.stop("recorded")

    trainer = make_trainer(
        Path(tempfile.mkdtemp()),
        shared_data_dir(),
        name="simpsons-demo",
        sink=sink,
        batch_size=32,  # as the stream was first recorded: a new one would change every picture
        max_iters=1000,
        sample_interval=100,
        sample_tokens=160,
        ckpt_interval=100,
    )
    trainer.run()
    records = []
    for event in events:
        if isinstance(event, StateChanged) and event.state == "stopped":
            break
        record = to_record(event)
        if "path" in record:  # no temporary folder names in the fixture
            record["path"] = f"runs/simpsons-demo/checkpoints/{Path(record['path']).name}"
        records.append(record)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    import sys

    if "--record" in sys.argv:
        record()


EXPERT_CHARS = Path(__file__).parent / "fixtures" / "expert_chars.jsonl"  # two evaluations of a Simpsons run


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_layout_experts_screen(snap_compare, size):
    events = recorded_events() + [from_record(json.loads(line)) for line in EXPERT_CHARS.read_text().splitlines()]
    assert snap_compare(Dashboard(replay=events), press=["r", "right"], terminal_size=size)
