"""What the README and docs/watching.md say of the dashboard's keys that test_dashboard.py does not drive: `?` and `e`, the
evaluating, saving and sampling states on the status line, and the sample dialog's temperature and
top-k, used while training is paused. Pilot tests on a tiny real trainer, as in test_dashboard.py."""

from __future__ import annotations

import threading

from moe_core.model.sampling import SampleRequest
from tests.test_dashboard import QUIET, SIZE, drive, fast_keys, one_torch_thread, shown, status_text, wait_until  # noqa: F401
from tests.test_training import make_trainer
from tui.dashboard.app import Dashboard
from tui.dashboard.screens import HelpScreen, SampleDialog
from tui.dashboard.widgets.panels import EventsLog, SamplesPanel


class Held:
    """Holds the trainer inside one of its methods (evaluate, snapshot, sample) until `release()`, so that
    the test can see what the screen shows while the trainer is busy there: otherwise a few ms."""

    def __init__(self, trainer, method: str):
        self.method = getattr(trainer, method)
        self.released = threading.Event()
        setattr(trainer, method, self)

    def __call__(self, *args, **kwargs):
        assert self.released.wait(60), "the test never released the trainer"
        return self.method(*args, **kwargs)

    def release(self) -> None:
        self.released.set()


def test_question_mark_shows_help_and_c_and_e_show_saving_and_evaluating(tmp_path, shared_dir, fast_keys):
    trainer = make_trainer(tmp_path, shared_dir, **QUIET)
    evaluating, saving = Held(trainer, "evaluate"), Held(trainer, "snapshot")

    async def scenario():
        app = Dashboard(trainer)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.view.step >= 5)
            await pilot.press("question_mark")
            await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))
            help_text = str(app.screen.query_one("#help-text").content)
            assert "pause / resume" in help_text and "evaluate now" in help_text and "sample now" in help_text
            await pilot.press("x")  # any key closes it
            await wait_until(pilot, lambda: not isinstance(app.screen, HelpScreen))

            await pilot.press("c")
            await wait_until(pilot, lambda: "SAVING" in status_text(app))
            saved_at = trainer.step_num
            saving.release()
            await wait_until(pilot, lambda: f"saved step-{saved_at:08d}" in shown(app.query_one(EventsLog)))
            assert (trainer.run_folder.checkpoints / f"step-{saved_at:08d}").is_dir()
            await wait_until(pilot, lambda: "RUNNING" in status_text(app))

            await pilot.press("e")
            await wait_until(pilot, lambda: "EVALUATING" in status_text(app))
            evaluated_at = trainer.step_num
            evaluating.release()
            await wait_until(pilot, lambda: "RUNNING" in status_text(app) and app.view.last_eval is not None)
            assert app.view.last_eval.step == evaluated_at
            await wait_until(pilot, lambda: "eval train" in shown(app.query_one(EventsLog)))

    drive(scenario)


async def sample_with(pilot, app, typed: dict[str, str]) -> None:
    """Open the sample dialog, type into the fields named (prompt, length, temperature, top-k) over what
    they hold, and press enter."""
    await pilot.press("s")
    await wait_until(pilot, lambda: isinstance(app.screen, SampleDialog))
    for i, field in enumerate(("prompt", "length", "temperature", "top-k")):
        if i:
            await pilot.press("tab")
        if field in typed:
            await pilot.press("end", "ctrl+u", *typed[field])
    await pilot.press("enter")


def test_sample_dialog_temperature_and_top_k_while_paused(tmp_path, shared_dir, fast_keys):
    trainer = make_trainer(tmp_path, shared_dir, **QUIET)
    sample = trainer.sample
    sampling = Held(trainer, "sample")

    async def scenario():
        app = Dashboard(trainer)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.view.step >= 5)
            await pilot.press("space")
            await wait_until(pilot, lambda: "PAUSED" in status_text(app))
            paused_at = trainer.step_num

            def answers() -> list:
                return [s for s in app.view.samples if s.requested][::-1]  # oldest first

            await sample_with(pilot, app, {"prompt": "Moe:", "length": "30", "temperature": "0", "top-k": ""})
            await wait_until(pilot, lambda: "SAMPLING" in status_text(app))
            sampling.release()
            await wait_until(pilot, lambda: len(answers()) == 1 and "PAUSED" in status_text(app))
            # Top-k 1 keeps only the likeliest character: greedy whatever the temperature ...
            await sample_with(pilot, app, {"temperature": "2", "top-k": "1"})
            await wait_until(pilot, lambda: len(answers()) == 2)
            # ... and without it, temperature 2 samples far from greedy.
            await sample_with(pilot, app, {"top-k": ""})
            await wait_until(pilot, lambda: len(answers()) == 3)
            await wait_until(pilot, lambda: "T=2" in shown(app.query_one(SamplesPanel)))

            assert trainer.step_num == paused_at and app.view.state == "paused"  # it never trained meanwhile
            greedy = sample(SampleRequest("Moe:", 30, temperature=0.0))
            first, top_1, hot = answers()
            assert [s.temperature for s in answers()] == [0.0, 2.0, 2.0]
            assert first.text == top_1.text == greedy and len(greedy) == len("Moe:") + 30
            assert hot.text.startswith("Moe:") and hot.text != greedy

    drive(scenario)
