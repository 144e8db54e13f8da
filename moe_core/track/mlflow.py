"""MLflow: to $MLFLOW_TRACKING_URI, else a SQLite store beside the runs (runs/mlflow.db, artifacts in
runs/mlflow-artifacts/). SQLite, not a ./mlruns folder: MLflow 3 refuses its file store unless
MLFLOW_ALLOW_FILE_STORE=true, and recommends sqlite:/// for local use."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from moe_core.events import State
from moe_core.track.base import Tracker


def artifacts_beside(uri: str) -> str | None:
    """Artifacts (the samples) of a SQLite store go beside its database file, not into ./mlruns of
    whatever folder training started in; a server keeps its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).parent / "mlflow-artifacts").resolve().as_uri()


def absolute(uri: str | None) -> str | None:
    """A SQLite URI with a relative path (sqlite:///mlflow.db) made absolute: a resume or an export
    started in another folder must reach the same database."""
    if uri and uri.startswith("sqlite:///") and not os.path.isabs(uri[len("sqlite:///") :]):
        return "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


@contextmanager
def one_at_a_time(uri: str) -> Iterator[None]:
    """Hold a lock beside a SQLite store while opening it: trainings started together in one runs folder
    would otherwise both create its tables, or the same experiment, and fail ("table ... already exists")."""
    if not uri.startswith("sqlite:///"):
        yield  # a server serialises its own writes
        return
    with open(uri[len("sqlite:///") :] + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


STATUS = {State.FINISHED: "FINISHED", State.STOPPED: "KILLED", State.ERROR: "FAILED"}


class MLflow(Tracker):
    name = package = "mlflow"
    one_text_per_step = True

    def open(self, params: dict[str, Any], start_step: int, continuing: bool) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        for noisy in ("mlflow", "alembic"):  # "Creating initial MLflow database tables..." on stderr
            logging.getLogger(noisy).setLevel(logging.WARNING)
        uri = self.entry.get("tracking_uri") or absolute(os.environ.get("MLFLOW_TRACKING_URI")) or self.local_uri()
        with one_at_a_time(uri):
            self.client = MlflowClient(tracking_uri=uri)  # creates (or migrates) a SQLite store's tables
            if continuing and self.entry.get("run_id"):
                self.run_id = self.entry["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                logged = self.client.get_run(self.run_id).data.params
            else:
                experiment = self.client.get_experiment_by_name(self.project)
                if experiment is None:
                    experiment_id = self.client.create_experiment(self.project, artifact_location=artifacts_beside(uri))
                else:
                    experiment_id = experiment.experiment_id
                self.run_id = self.client.create_run(
                    experiment_id, run_name=self.run.name, tags={"moe-tui.run": self.run.name}
                ).info.run_id
                logged = {}
        self.entry.update(tracking_uri=uri, run_id=self.run_id, project=self.project)
        # Params cannot change in MLflow: a resume adds the keys the run lacks and keeps the rest.
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def local_uri(self) -> str:
        return "sqlite:///" + str((self.run.path.parent / "mlflow.db").resolve())

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def text(self, step: int, key: str, text: str) -> None:
        self.client.log_text(self.run_id, text, f"{key}/step-{step:08d}.txt")

    def close(self, outcome: str) -> None:
        self.client.set_terminated(self.run_id, STATUS.get(outcome, "KILLED"))

    @classmethod
    def describe(cls, run, entry: dict[str, Any]) -> str:
        uri = entry.get("tracking_uri", "?")
        where = f"`mlflow ui --backend-store-uri {uri}`" if uri.startswith("sqlite:") else f"the MLflow UI at {uri}"
        return f"run {entry.get('run_id', '?')} in experiment '{entry.get('project', '?')}' at {uri}; open with {where}"


TRACKER = MLflow
