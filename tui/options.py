"""Option types and hints shared by the `moe-tui` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from moe_core.store.runs import default_runs_dir

MODEL = "Model"
TRAINING = "Training"
SCHEDULE = "Evaluation, sampling, checkpoints"
DATA = "Data and runs"
TRACKING = "Experiment tracking"

DataDir = Annotated[Optional[Path], typer.Option("--data-dir", help="Dataset cache \\[default: $MOE_TUI_DATA or ./data]", rich_help_panel=DATA)]
RunsDir = Annotated[Optional[Path], typer.Option("--runs-dir", help="Run output \\[default: $MOE_TUI_RUNS or ./runs]", rich_help_panel=DATA)]


def opt(help: str, panel: str = MODEL, flag: str | None = None, **kw: Any) -> Any:
    names = [flag] if flag else []
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False, **kw)



def runs_dir_flag(runs_dir: Path) -> str:
    return "" if Path(runs_dir) == default_runs_dir() else f" --runs-dir {runs_dir}"


def resume_command(name: str, runs_dir: Path) -> str:
    return f"moe-tui train --resume {name}{runs_dir_flag(runs_dir)}"


def sample_command(name: str, runs_dir: Path) -> str:
    return f"moe-tui sample {name}{runs_dir_flag(runs_dir)}"


def watch_command(name: str, runs_dir: Path) -> str:
    return f"moe-tui watch {name}{runs_dir_flag(runs_dir)}"


def stop_command(name: str, runs_dir: Path) -> str:
    return f"moe-tui stop {name}{runs_dir_flag(runs_dir)}"
