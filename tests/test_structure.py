"""The structure stays as built: import-linter's contracts in pyproject.toml hold, and they do catch a
back-edge hidden inside a function; a command that neither trains nor tracks to a backend does not need
the trackers a run was trained with."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from tests.conftest import REPO

LINT_IMPORTS = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold():
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Contracts: {len(contracts)} kept, 0 broken." in done.stdout
    assert {"layers", "forbidden", "acyclic_siblings"} <= {c["type"] for c in contracts}


def test_a_back_edge_inside_a_function_breaks_them(tmp_path):
    """The cycles this project once had were each held together by an import inside a function: the
    contracts see those too."""
    for package in ("moe_core", "tui"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    sampling = tmp_path / "moe_core" / "model" / "sampling.py"
    sampling.write_text(sampling.read_text() + "\n\ndef _late():\n    from moe_core.train.trainer import Trainer\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "moe_core.model.sampling -> moe_core.train.trainer" in done.stdout, done.stdout


def test_export_does_not_need_the_trackers_a_run_was_trained_with(trained_once, tmp_path):
    """A run trained with --track mlflow on another machine exports to TensorBoard here, where mlflow is
    not installed, with or without a new --track-project (whose check once asked for mlflow)."""
    runs = tmp_path / "runs"
    shutil.copytree(trained_once, runs / "tiny")
    config = runs / "tiny" / "config.toml"
    config.write_text(config.read_text().replace("track = []", 'track = ["mlflow"]'))
    assert 'track = ["mlflow"]' in config.read_text()
    hidden = tmp_path / "no-mlflow" / "mlflow"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'mlflow'\", name='mlflow')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "no-mlflow"), "PYTHONDONTWRITEBYTECODE": "1"}
    for extra in ([], ["--track-project", "elsewhere"]):
        done = subprocess.run(
            [sys.executable, "-m", "tui", "export", "tiny", "--to", "tensorboard", "--runs-dir", str(runs), *extra],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "exported run 'tiny' to tensorboard" in done.stdout or "nothing to send" in done.stdout, done.stdout
    assert list((runs / "tiny").rglob("events.out.tfevents.*")), "no TensorBoard event file was written"
