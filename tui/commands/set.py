"""`moe-tui set RUN KEY=VALUE ...`: change a live run's settings between two of its steps."""

from __future__ import annotations

from typing import Annotated

import typer

from moe_core.config import LIVE_KEYS
from moe_core.live.steer import change_settings
from moe_core.store.runs import Run, default_runs_dir
from moe_core.train.settings import parse_assignments
from tui.options import RunsDir


def set_(
    run: Annotated[str, typer.Argument(help="Run name (see `moe-tui runs`)")],
    assignments: Annotated[
        list[str], typer.Argument(help=f"KEY=VALUE, e.g. lr=1e-3; keys: {', '.join(LIVE_KEYS)}", show_default=False)
    ],
    *,
    runs_dir: RunsDir = None,
) -> None:
    """Change a live run's settings (learning rate, loss weights, dropout, intervals...) without stopping it."""
    target = Run.open(runs_dir or default_runs_dir(), run)
    made = change_settings(target, parse_assignments(assignments), source="moe-tui set")
    if not made:
        print(f"run '{run}' already has those settings; nothing changed")
    for change in made:
        print(f"{change.key} {change.old} -> {change.new} at step {change.step} (run '{run}')")
