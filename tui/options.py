"""Option types and help panels shared by the `moe-tui` commands (the hints they print: moe_core/hints.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

MODEL = "Model"
TRAINING = "Training"
SCHEDULE = "Evaluation, sampling, checkpoints"
DATA = "Data and runs"
TRACKING = "Experiment tracking"

DataDir = Annotated[
    Optional[Path],
    typer.Option("--data-dir", help="Dataset cache \\[default: $MOE_TUI_DATA or ./data]", rich_help_panel=DATA),
]
RunsDir = Annotated[
    Optional[Path],
    typer.Option("--runs-dir", help="Run output \\[default: $MOE_TUI_RUNS or ./runs]", rich_help_panel=DATA),
]


def opt(help: str, panel: str = MODEL, flag: str | None = None, **kw: Any) -> Any:
    names = [flag] if flag else []
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False, **kw)
