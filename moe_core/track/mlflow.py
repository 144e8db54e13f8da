"""MLflow: to $MLFLOW_TRACKING_URI, else a SQLite store beside the runs (runs/mlflow.db, artifacts in
runs/mlflow-artifacts/). SQLite, not a ./mlruns folder: MLflow 3 refuses its file store unless
MLFLOW_ALLOW_FILE_STORE=true, and recommends sqlite:/// for local use."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from .base import Tracker

def artifacts_beside(uri: str) -> str | None:
    """Artifacts (the samples) of a SQLite store go beside its database file, not into ./mlruns of
    whatever folder training started in; a server keeps its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).parent / "mlflow-artifacts").resolve().as_uri()


STATUS = {"finished": "FINISHED", "stopped": "KILLED", "error": "FAILED"}


class MLflow(Tracker):
    name = package = "mlflow"

    def open(self, params: dict[str, Any], start_step: int, continuing: bool) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        for noisy in ("mlflow", "alembic"):  # "Creating initial MLflow database tables..." on stderr
            logging.getLogger(noisy).setLevel(logging.WARNING)
        uri = self.entry.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or self.local_uri()
        self.client = MlflowClient(tracking_uri=uri)
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
            self.run_id = self.client.create_run(experiment_id, run_name=self.run.name,
                                                 tags={"moe-tui.run": self.run.name}).info.run_id
            logged = {}
        self.entry.update(tracking_uri=uri, run_id=self.run_id, experiment=self.project)
        # Params cannot change in MLflow: a resume adds the keys the run lacks and keeps the rest.
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])

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
        where = (f"`mlflow ui --backend-store-uri {uri}`" if uri.startswith("sqlite:") else f"the MLflow UI at {uri}")
        return f"run {entry.get('run_id', '?')} in experiment '{entry.get('experiment', '?')}' at {uri}; open with {where}"


TRACKER = MLflow
