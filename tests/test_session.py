"""The training session from Python, without Typer: the example of docs/development.md, run as written
there but small, and a resume through the same call."""

from __future__ import annotations

from moe_core.events import EvalMetrics, RunStarted, State
from moe_core.session.prepare import TrainRequest
from moe_core.session.training import TrainingSession
from moe_core.signals import outcome_exit_code
from tests.conftest import TINY


def train(request: TrainRequest) -> tuple[int, list, TrainingSession]:
    events = []

    def front_end(running):
        running.bus.subscribe(events.append)
        outcome = running.trainer.run()
        return outcome_exit_code(outcome, running.trainer.unsaved)

    session = TrainingSession(request)
    session.prepare()
    return session.train(front_end), events, session


def test_a_script_trains_and_resumes_through_the_session(tmp_path, shared_dir):
    settings = {**TINY, "max_iters": 20, "eval_interval": 10, "ckpt_interval": 10, "sample_tokens": 0}
    request = TrainRequest("simpsons", settings=settings, run_name="py", data_dir=shared_dir, runs_dir=tmp_path)
    code, events, session = train(request)
    assert code == 0
    assert [e.step for e in events if isinstance(e, EvalMetrics)] == [10, 20]
    assert session.plan.run.checkpoint("latest").name == "step-00000020"
    assert any(getattr(e, "state", None) == State.FINISHED for e in events)

    longer = TrainRequest(settings={"max_iters": 30}, resume="py", data_dir=shared_dir, runs_dir=tmp_path)
    code, events, session = train(longer)
    started = next(e for e in events if isinstance(e, RunStarted))
    assert code == 0 and started.resumed and started.start_step == 20
    assert session.plan.changed == {"max_iters": 30}
    assert session.plan.run.checkpoint("latest").name == "step-00000030"
