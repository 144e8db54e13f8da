"""Experiment tracking: tiny real runs sent to TensorBoard, MLflow, W&B (offline) and Trackio, read back
through each library's own reader; resume without a step twice; export; a failing or slow tracker."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from moe_core.bus import EventBus
from moe_core.events import Alert, Notice, Sample, StepMetrics
from moe_core.store.runs import Run
from moe_core.track import Tracker, Tracking, trackers
from moe_core.track.base import TEXTS_APART
from moe_core.track.sink import TrackerSink, TrackerState
from tests.conftest import cli
from tests.test_faults import wait_until
from tests.test_training import make_trainer

# 40 small steps: a log line every 10, an evaluation every 10, a sample and a checkpoint every 20.
SHORT = dict(
    max_iters=40,
    eval_interval=10,
    log_interval=10,
    sample_interval=20,
    ckpt_interval=20,
    batch_size=8,
    eval_iters=2,
    sample_tokens=20,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No tracker may reach the network: W&B logged out (and pointed at a closed port), MLflow local."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", os.devnull)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with its tables made: making them takes seconds, so each test gets a
    copy (`mlflow_store`). Making one is tested on its own, by three trainings at once."""
    need("mlflow")
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the tables
    return path


@pytest.fixture
def mlflow_store(migrated_store):
    """Puts a copy of the migrated store at a path; returns it."""

    def put(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(migrated_store, path)
        return path

    return put


def need(*names: str) -> None:
    """The trackers' packages (the `track` extra): a skip here, a failure in CI (tests/no_skips_in_ci.py)."""
    for name in names:
        pytest.importorskip(trackers()[name].package, reason=f"pip install 'moe-tui[{name}]' to test it")


def tracked_run(
    tmp_path: Path,
    shared_dir: Path,
    track: list[str],
    name: str = "run",
    resume: bool = False,
    backends=(),
    **overrides,
):
    """Train a tiny run with these trackers on the bus; returns the trainer and every event."""
    need(*track)
    settings = {**SHORT, "track": track, "track_project": f"p-{tmp_path.name}"[:60], **overrides}
    trainer = make_trainer(tmp_path, shared_dir, name=name, resume=resume, **settings)
    bus, events = EventBus(), []
    bus.subscribe(events.append)
    trainer.on_event = bus
    tracking = Tracking(trainer.config, trainer.run_folder, bus, backends=backends)
    assert trainer.run() == "finished"
    tracking.close()
    return trainer, events


def logged(run: Run, kind: str, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in run.read_metrics() if r["event"] == kind]


def warnings(events) -> list[str]:
    return [e.message for e in events if isinstance(e, Notice) and e.level != "info"]


def entry(run: Run, name: str) -> dict:
    return json.loads((run.path / "trackers.json").read_text())[name]


# -- readers: each library's own ------------------------------------------------------------------


def tensorboard_scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def mlflow_history(run: Run, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    e = entry(run, "mlflow")
    return sorted((m.step, m.value) for m in MlflowClient(e["tracking_uri"]).get_metric_history(e["run_id"], key))


def wandb_history(run: Run) -> list[dict]:
    """Every history row of every offline run folder (a resume makes another), read by `wandb leet inspect`."""
    rows = []
    for folder in sorted((run.path / "wandb").glob("offline-run-*")):
        done = subprocess.run(
            [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(folder)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        rows += [
            json.loads(line)["history"]["item"]
            for line in done.stdout.splitlines()
            if json.loads(line).get("type") == "history"
        ]
    return rows


def trackio_logs(run: Run) -> list[dict]:
    import trackio

    e = entry(run, "trackio")
    assert e["run"] in [r.name for r in trackio.Api().runs(e["project"])]
    return trackio.SQLiteStorage.get_logs(e["project"], e["run"], run_id=e["run_id"])


def same(points, expected) -> bool:
    """The same steps, and values equal to float32 precision (TensorBoard keeps float32)."""
    assert [s for s, _ in points] == [s for s, _ in expected]
    assert [v for _, v in points] == pytest.approx([v for _, v in expected], rel=1e-6)
    return True


# -- each backend ------------------------------------------------------------------------------------


def test_tensorboard_val_loss_equals_metrics_jsonl_step_for_step(tmp_path, shared_dir):
    trainer, events = tracked_run(tmp_path, shared_dir, ["tensorboard"])
    run = trainer.run_folder
    val = logged(run, "EvalMetrics", "val_loss")
    assert [s for s, _ in val] == [10, 20, 30, 40]
    assert same(tensorboard_scalars(run.path / "tensorboard", "eval/val_loss"), val)
    assert same(tensorboard_scalars(run.path / "tensorboard", "train/loss"), logged(run, "StepMetrics", "loss"))
    assert [s for s, _ in tensorboard_scalars(run.path / "tensorboard", "experts/layer1/expert3")] == [10, 20, 30, 40]
    assert not warnings(events)


def test_mlflow_params_equal_the_config_and_val_loss_history_equals_metrics_jsonl(
    tmp_path, shared_dir, monkeypatch, mlflow_store
):
    uri = f"sqlite:///{mlflow_store(tmp_path / 'tracking' / 'mlflow.db')}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    trainer, events = tracked_run(tmp_path, shared_dir, ["mlflow"])
    run = trainer.run_folder
    from mlflow import MlflowClient

    e = entry(run, "mlflow")
    assert e["tracking_uri"] == uri
    tracked = MlflowClient(uri).get_run(e["run_id"])
    config = run.load_config().to_dict()
    assert {k: tracked.data.params[k] for k in config} == {
        k: ", ".join(v) if isinstance(v, list) else str(v) for k, v in config.items()
    }
    assert int(tracked.data.params["params_total"]) == trainer.params_total
    assert same(mlflow_history(run, "eval/val_loss"), logged(run, "EvalMetrics", "val_loss"))
    assert tracked.info.status == "FINISHED"
    assert not warnings(events)


def test_wandb_offline_run_folder_holds_the_history(tmp_path, shared_dir):
    trainer, events = tracked_run(tmp_path, shared_dir, ["wandb"])
    run = trainer.run_folder
    assert entry(run, "wandb")["mode"] == "offline"
    rows = wandb_history(run)
    val = [(row["_step"], row["eval/val_loss"]) for row in rows if "eval/val_loss" in row]
    assert same(val, logged(run, "EvalMetrics", "val_loss"))
    assert [row["_step"] for row in rows if "samples/periodic._type" in row] == [20, 40]
    assert not warnings(events)


def test_trackio_logs_read_back_through_its_api(tmp_path, shared_dir):
    trainer, events = tracked_run(tmp_path, shared_dir, ["trackio"])
    run = trainer.run_folder
    logs = trackio_logs(run)
    val = [(row["step"], row["eval/val_loss"]) for row in logs if "eval/val_loss" in row]
    assert same(val, logged(run, "EvalMetrics", "val_loss"))
    assert not warnings(events)


# -- resume ----------------------------------------------------------------------------------------


def test_a_resumed_run_has_each_step_once_in_each_backend(tmp_path, shared_dir, mlflow_store):
    every = ["tensorboard", "mlflow", "wandb", "trackio"]
    mlflow_store(tmp_path / "mlflow.db")  # where a run's MLflow store goes: beside it
    trainer, _ = tracked_run(tmp_path, shared_dir, every)
    # As if the process had died after step 40 with only the checkpoint of step 20 on disk: the trackers
    # hold steps 21-40, which the resumed run trains again.
    shutil.rmtree(trainer.run_folder.checkpoints / "step-00000040")
    trainer, events = tracked_run(tmp_path, shared_dir, every, resume=True, max_iters=60)
    assert trainer.resumed and not warnings(events)
    run = trainer.run_folder
    steps = [s for s, _ in logged(run, "StepMetrics", "loss")]
    assert steps == [10, 20, 30, 40, 50, 60]
    assert [s for s, _ in tensorboard_scalars(run.path / "tensorboard", "train/loss")] == steps
    assert [s for s, _ in mlflow_history(run, "train/loss")] == steps
    assert [row["_step"] for row in wandb_history(run) if "train/loss" in row] == steps
    assert [row["step"] for row in trackio_logs(run) if "train/loss" in row] == steps
    # The same tracked run, continued: one MLflow run, one W&B id in both offline folders.
    # (offline-run-DATE_TIME-ID; W&B adds "-1" to a folder started in the same second as the last)
    folders = [re.match(r"offline-run-\d{8}_\d{6}-([^-]+)", p.name) for p in (run.path / "wandb").glob("offline-run-*")]
    assert folders and len({m.group(1) for m in folders}) == 1
    # TensorBoard holds the retrained values (purged and rewritten); the others keep the first ones.
    assert same(tensorboard_scalars(run.path / "tensorboard", "eval/val_loss"), logged(run, "EvalMetrics", "val_loss"))


def test_tracking_added_on_a_resume_sends_the_steps_logged_before_it(tmp_path, shared_dir, mlflow_store):
    mlflow_store(tmp_path / "mlflow.db")
    trainer, _ = tracked_run(tmp_path, shared_dir, [], max_iters=20)  # untracked to step 20
    trainer, events = tracked_run(tmp_path, shared_dir, ["tensorboard", "mlflow"], resume=True)
    assert trainer.resumed and not warnings(events)
    run = trainer.run_folder
    steps = [s for s, _ in logged(run, "StepMetrics", "loss")]
    assert steps == [10, 20, 30, 40]
    assert [s for s, _ in tensorboard_scalars(run.path / "tensorboard", "train/loss")] == steps
    assert [s for s, _ in mlflow_history(run, "train/loss")] == steps
    assert same(mlflow_history(run, "eval/val_loss"), logged(run, "EvalMetrics", "val_loss"))


def test_a_changed_project_on_resume_keeps_the_tracked_run_where_it_started_and_says_so(
    tmp_path, shared_dir, mlflow_store
):
    mlflow_store(tmp_path / "mlflow.db")
    trainer, _ = tracked_run(tmp_path, shared_dir, ["mlflow", "trackio"], max_iters=20)
    started_in = trainer.config.track_project
    trainer, events = tracked_run(
        tmp_path, shared_dir, ["mlflow", "trackio", "tensorboard"], resume=True, track_project="elsewhere"
    )
    run = trainer.run_folder
    moved = [w for w in warnings(events) if "elsewhere" in w]
    assert sorted(w.split()[1] for w in moved) == ["mlflow", "trackio"] and len(warnings(events)) == 2
    assert f"goes on with its tracked run in project '{started_in}'" in moved[0]
    for name in ("mlflow", "trackio"):
        assert entry(run, name)["project"] == started_in
    from mlflow import MlflowClient

    client = MlflowClient(entry(run, "mlflow")["tracking_uri"])
    assert client.get_experiment_by_name("elsewhere") is None
    assert (
        client.get_run(entry(run, "mlflow")["run_id"]).info.experiment_id
        == client.get_experiment_by_name(started_in).experiment_id
    )
    assert [s for s, _ in mlflow_history(run, "train/loss")] == [10, 20, 30, 40]
    assert [row["step"] for row in trackio_logs(run) if "train/loss" in row] == [10, 20, 30, 40]


def test_samples_asked_for_at_one_step_all_reach_the_trackers_that_keep_one_text_per_step(tmp_path, mlflow_store):
    need("mlflow", "wandb")
    mlflow_store(tmp_path / "mlflow.db")
    run = Run(tmp_path / "paused")
    run.path.mkdir()
    asked = [
        Sample(30, "\n", "HOMER: first", True),
        Sample(30, "M", "MOE: second", True),
        Sample(40, "\n", "BART: later", True),
    ]
    tracking = Tracking(run_config(), run, names=["mlflow", "wandb"])
    tracking.replay(asked)
    tracking.close(timeout=None)
    from mlflow import MlflowClient

    e = entry(run, "mlflow")
    client = MlflowClient(e["tracking_uri"])
    texts = [
        Path(client.download_artifacts(e["run_id"], f"samples/requested/step-000000{s}.txt", str(tmp_path))).read_text()
        for s in (30, 40)
    ]
    assert texts == ["HOMER: first" + TEXTS_APART + "MOE: second", "BART: later"]
    rows = [row for row in wandb_history(run) if "samples/requested.path" in row]  # a media file per row
    assert [row["_step"] for row in rows] == [30, 40]
    step_30 = next((run.path / "wandb").glob("offline-run-*/files/" + rows[0]["samples/requested.path"])).read_text()
    assert "HOMER: first" in step_30 and "MOE: second" in step_30


def test_a_relative_mlflow_sqlite_uri_is_kept_as_the_database_it_named(tmp_path, monkeypatch, mlflow_store):
    need("mlflow")
    mlflow_store(tmp_path / "relative.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///relative.db")
    run = Run(tmp_path / "runs" / "r")
    run.path.mkdir(parents=True)
    tracking = Tracking(run_config(), run, names=["mlflow"])
    tracking.replay([StepMetrics(10, 2.0, 0.0, 0.0, 1e-3, 1.0, 1e4, 0.1)])
    tracking.close(timeout=None)
    assert entry(run, "mlflow")["tracking_uri"] == f"sqlite:///{tmp_path / 'relative.db'}"
    monkeypatch.chdir(run.path)  # a resume or an export from another folder reads the same store
    assert mlflow_history(run, "train/loss") == [(10, 2.0)]


TRACK_AT = """
import sys, time
from pathlib import Path
from moe_core.config import Config
from moe_core.events import Notice, StepMetrics
from moe_core.store.runs import Run
from moe_core.track import Tracking
run, published = Run(Path(sys.argv[1])), []
run.path.mkdir()
print("ready", flush=True)
while not Path(sys.argv[2]).exists():  # all three start at the same instant
    time.sleep(0.001)
tracking = Tracking(Config(), run, names=["mlflow"], publish=published.append)
tracking.replay([StepMetrics(10, 2.0, 0.0, 0.0, 1e-3, 1.0, 1e4, 0.1)])
tracking.close(timeout=None)
print([e.message for e in published if isinstance(e, Notice) and e.level != "info"])
"""


def test_trainings_started_together_share_a_new_mlflow_store(tmp_path, monkeypatch):
    # Without the lock beside runs/mlflow.db, 5 of 6 such starts failed here ("table ... already exists").
    need("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    go = tmp_path / "go"
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", TRACK_AT, str(tmp_path / name), str(go)],
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        for name in ("a", "b", "c")
    ]
    assert [p.stdout.readline().strip() for p in starts] == ["ready"] * 3  # imports done
    go.touch()
    assert [p.communicate(timeout=120)[0].strip() for p in starts] == ["[]", "[]", "[]"]
    for name in ("a", "b", "c"):
        assert mlflow_history(Run(tmp_path / name), "train/loss") == [(10, 2.0)]


# -- export -----------------------------------------------------------------------------------------


def test_export_sends_a_recorded_run_and_again_adds_nothing(trained, capsys, mlflow_store):
    need("tensorboard", "mlflow", "wandb")
    mlflow_store(trained.parent / "mlflow.db")
    run = Run(trained)
    code, out, err = cli(capsys, "export", "tiny", "--to", "tensorboard")
    assert code == 0, err
    assert "exported run 'tiny' to tensorboard: event files in" in out
    assert same(tensorboard_scalars(trained / "tensorboard", "eval/val_loss"), logged(run, "EvalMetrics", "val_loss"))
    last = logged(run, "StepMetrics", "loss")[-1][0]
    for to in ("mlflow", "wandb"):
        for again in (False, True):
            code, out, err = cli(capsys, "export", "tiny", "--to", to)
            assert code == 0, err
            assert (f"already in {to} up to its last step ({last}); nothing to send" in out) == again, out
    assert same(mlflow_history(run, "eval/val_loss"), logged(run, "EvalMetrics", "val_loss"))
    assert len(list((trained / "wandb").glob("offline-run-*"))) == 1  # no empty run made by the second export
    # What a kill -9 while tracking leaves: the MLflow run RUNNING, its entry not closed. Export ends it.
    from mlflow import MlflowClient

    e = entry(run, "mlflow")
    MlflowClient(e["tracking_uri"]).update_run(e["run_id"], status="RUNNING")
    state = json.loads((trained / "trackers.json").read_text())
    state["mlflow"]["closed"] = False
    (trained / "trackers.json").write_text(json.dumps(state))
    code, out, err = cli(capsys, "export", "tiny", "--to", "mlflow")
    assert code == 0 and "exported run 'tiny' to mlflow" in out, err
    assert MlflowClient(e["tracking_uri"]).get_run(e["run_id"]).info.status == "FINISHED"
    assert same(mlflow_history(run, "eval/val_loss"), logged(run, "EvalMetrics", "val_loss"))  # nothing twice
    code, out, err = cli(capsys, "runs", "show", "tiny")
    assert "tracked in mlflow: run " in out and "tracked in tensorboard: " in out


def test_track_in_a_config_file_and_runs_show_names_where(env, shared_dir, capsys, tmp_path):
    need("tensorboard")
    (tmp_path / "track.toml").write_text('[tracking]\ntrack = ["tensorboard"]\ntrack_project = "mine"\n')
    code, out, err = cli(
        capsys,
        "train",
        "simpsons",
        "--config",
        str(tmp_path / "track.toml"),
        "--n-layer",
        "1",
        "--n-embd",
        "32",
        "--block-size",
        "16",
        "--batch-size",
        "8",
        "--max-iters",
        "10",
        "--eval-interval",
        "10",
        "--log-interval",
        "5",
        "--device",
        "cpu",
        "--run-name",
        "t",
        "--headless",
    )
    assert code == 0, err
    assert "info: tracker tensorboard: event files in" in out
    assert tensorboard_scalars(env / "t" / "tensorboard", "train/loss")
    code, out, err = cli(capsys, "runs", "show", "t")
    assert 'track = ["tensorboard"]' in out and "tracked in tensorboard: event files in" in out
    assert "tensorboard --logdir" in out


# -- trackers that fail or fall behind ------------------------------------------------------------


class Raising(Tracker):
    """Every call raises; it notes each call it gets."""

    name = "raising"

    def __init__(self, *args):
        super().__init__(*args)
        self.calls: list[str] = []

    def open(self, *args):
        self.calls.append("open")
        raise ConnectionError("server down")

    def scalars(self, *args):
        self.calls.append("scalars")
        raise ConnectionError("server down")

    def text(self, *args):
        self.calls.append("text")
        raise ConnectionError("server down")

    def close(self, *args):
        self.calls.append("close")
        raise ConnectionError("server down")


def test_a_tracker_that_always_raises_warns_once_and_changes_nothing(tmp_path, shared_dir):
    plain, _ = tracked_run(tmp_path / "plain", shared_dir, [])
    raising = Raising(Run(tmp_path / "raising"), "p", {})
    trainer, events = tracked_run(tmp_path / "raising", shared_dir, [], backends=[raising])
    assert raising.calls == ["open"]  # off after its first failure: nothing more sent to it, not even a close
    assert warnings(events) == [
        "tracker raising failed (server down); it is off for the rest of this run, training goes on"
    ]
    assert [e for e in events if isinstance(e, StepMetrics)][-1].step == 40
    for key, value in plain.model.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[key]), key


class Stuck(Tracker):
    name = "stuck"

    def __init__(self, *args):
        super().__init__(*args)
        self.release, self.sent, self.opened = threading.Event(), [], threading.Event()

    def open(self, *args):
        self.release.wait(120)  # a bound, so that a failing test ends
        self.opened.set()

    def scalars(self, step, values):
        self.sent.append(step)

    def close(self, outcome):
        pass

    @classmethod
    def describe(cls, run, entry):
        return "nowhere"


def test_a_tracker_that_falls_behind_never_blocks_the_publisher(tmp_path):
    run = Run(tmp_path)
    published = []
    tracker = Stuck(run, "p", {})
    sink = TrackerSink(tracker, run_config(), TrackerState(run), published.append, queue_size=5)
    for step in range(1, 1001):
        sink(StepMetrics(step, 1.0, 0.0, 0.0, 1e-3, 1.0, 1e4, 0.1))
    assert not tracker.opened.is_set()  # a thousand events handed over while the tracker was still stuck
    tracker.release.set()
    sink.close()
    assert [n.message for n in published if n.level == "warning"] == [
        "tracker stuck is falling behind: events are being dropped for it; training goes on"
    ]
    assert 0 < len(tracker.sent) <= 6 and tracker.sent == sorted(tracker.sent)


class FailsAtStep(Stuck):
    """A tracker that records the steps sent to it, and fails to send one of them."""

    name = "flaky"

    def __init__(self, run, fail_at: int):
        super().__init__(run, "p", {})
        self.fail_at = fail_at
        self.release.set()  # never stuck

    def scalars(self, step, values):
        if step == self.fail_at:
            raise ConnectionError("server down")
        super().scalars(step, values)


def test_a_step_a_tracker_failed_to_send_is_sent_by_the_next_export(tmp_path):
    run, state = Run(tmp_path), TrackerState(Run(tmp_path))
    events = [StepMetrics(step, 1.0, 0.0, 0.0, 1e-3, 1.0, 1e4, 0.1) for step in (10, 20, 30)]
    first = FailsAtStep(run, fail_at=20)
    sink = TrackerSink(first, run_config(), state, lambda event: None)
    sink.replay(events)
    sink.close()
    assert first.sent == [10] and entry(run, "flaky")["last_step"] == 19  # step 20 is not counted as sent

    again = FailsAtStep(run, fail_at=-1)
    sink = TrackerSink(again, run_config(), TrackerState(run), lambda event: None)
    sink.replay(events)  # what `moe-tui export` does
    sink.close()
    assert again.sent == [20, 30]


def test_closing_waits_once_for_all_trackers_together_and_ends_them(tmp_path, monkeypatch):
    from moe_core.track import sink as base

    monkeypatch.setattr(base, "ABANDON_GRACE", 600.0)  # the trackers are let go by the test, long before
    run, published = Run(tmp_path), []
    stuck = [Stuck(run, "p", {}) for _ in range(3)]
    tracking = Tracking(run_config(), run, publish=published.append, names=[], backends=stuck)
    for sink in tracking.sinks:
        sink(StepMetrics(10, 1.0, 0.0, 0.0, 1e-3, 1.0, 1e4, 0.1))
    closing = threading.Thread(target=tracking.close, kwargs={"timeout": 1.0})
    closing.start()
    # One deadline for all three: past it, all three are given up on together and share the grace. Were
    # the deadline each one's, the second would wait for the first one's grace (600 s) to run out.
    wait_until(lambda: all(sink.abandoned for sink in tracking.sinks), 60, "all three trackers given up on")
    said = len(published)
    again = threading.Thread(target=tracking.close, kwargs={"timeout": 1.0})  # as a headless run's way out does
    again.start()
    again.join(60)
    assert not again.is_alive() and len(published) == said  # the second close did nothing, waited for nothing
    for tracker in stuck:
        tracker.release.set()
    closing.join(60)
    assert not closing.is_alive()
    messages = [n.message for n in published]
    assert messages[0].startswith("sending what is left to stuck, stuck, stuck (up to 1 s)")
    assert sum("did not finish sending in time" in m for m in messages) == 3


def run_config():
    from moe_core.config import Config

    return Config()


def test_a_live_change_and_a_guard_alert_reach_the_trackers(tmp_path, shared_dir):
    """TensorBoard read back through its own reader: the new value as settings/KEY from its step on, the
    change and the alert as text."""
    need("tensorboard")
    trainer = make_trainer(tmp_path, shared_dir, **{**SHORT, "track": ["tensorboard"], "max_iters": 30})
    bus = EventBus()
    trainer.on_event = bus
    tracking = Tracking(trainer.config, trainer.run_folder, bus)
    step = trainer.step

    def step_then_steer():
        step()
        if trainer.step_num == 12:
            trainer.control.set({"aux_loss_coef": 0.05}, "test")
            trainer.control.alert(Alert(12, "loss_spike", "loss 9.0 is 4.5x its running mean", "warn", 12))

    trainer.step = step_then_steer
    assert trainer.run() == "finished"
    tracking.close()
    logdir = trainer.run_folder.path / "tensorboard"
    assert tensorboard_scalars(logdir, "settings/aux_loss_coef") == [(12, pytest.approx(0.05))]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    texts = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    texts.Reload()
    tags = texts.Tags()["tensors"]
    assert "settings/changes/text_summary" in tags and "alerts/text_summary" in tags, tags
    said = texts.Tensors("alerts/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "loss_spike" in said and "4.5x its running mean" in said
