"""`moe-tui export RUN --to TRACKER`: send a recorded run (finished, stopped, or from before tracking
existed) to a tracker, by replaying its `metrics.jsonl` and `samples.txt` through the same sink that
follows a live run."""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Annotated, Optional

import typer

from moe_core.config import validate
from moe_core.errors import UserError
from moe_core.events import Event, Notice, Sample
from moe_core.hints import resume_command, stop_command
from moe_core.live.lease import read_status
from moe_core.store.runs import Run, default_runs_dir
from moe_core.track import Tracking, check_trackers, trackers, where_written
from moe_core.track.base import SENT
from moe_core.track.sink import TrackerState
from tui.commands.runs import run_state
from tui.options import RunsDir


def export(
    run: Annotated[str, typer.Argument(help="Run name (see `moe-tui runs`)")],
    to: Annotated[str, typer.Option("--to", help="tensorboard | mlflow | wandb | trackio", show_default=False)],
    track_project: Annotated[
        Optional[str],
        typer.Option(
            help="Project (experiment) name in the tracker \\[default: the run's, or moe-tui]", show_default=False
        ),
    ] = None,
    runs_dir: RunsDir = None,
) -> None:
    """Send a recorded run to a tracker (again: only the steps it does not have yet)."""
    check_trackers([to], flag="--to")
    r = Run.open(runs_dir or default_runs_dir(), run)
    if read_status(r).state in ("live", "starting"):
        raise UserError(
            f"run '{r.name}' is training now; export it once it has stopped (`{stop_command(r.name, r.path.parent)}` "
            f"stops it, and `{resume_command(r.name, r.path.parent)} --track {to}` would go on tracked)"
        )
    config = r.load_config()
    if track_project is not None:
        config = dataclasses.replace(config, track_project=track_project)
        validate(config)
    events = recorded_events(r)
    entry = TrackerState.read(r).get(to, {})
    held = entry.get("last_step", -1)
    if entry.get("closed") and not any(getattr(e, "step", -1) > held for e in events if isinstance(e, SENT)):
        # Nothing to add, and its status is final: no tracked run reopened just to be ended again (W&B
        # would leave an empty one). One a crash left open is reopened, and ended as the run ended.
        print(f"run '{r.name}' is already in {to} up to its last step ({held}); nothing to send")
        return
    warnings: list[str] = []

    def publish(event: Event) -> None:
        if isinstance(event, Notice) and event.level != "info":
            warnings.append(event.message)
            print(f"{event.level}: {event.message}", file=sys.stderr)

    tracking = Tracking(config, r, names=[to], publish=publish)
    tracking.replay(events)
    state = run_state(r)
    tracking.close(outcome=state if state in ("finished", "error") else "stopped", timeout=None)
    if warnings:
        raise typer.Exit(1)
    line = next((line for line in where_written(r) if line.startswith(f"{to}: ")), f"{to}: {trackers()[to].name}")
    print(f"exported run '{r.name}' to {line}")


def recorded_events(run: Run) -> list[Event]:
    """The run's logged events, with its samples from samples.txt where metrics.jsonl has none
    (runs logged before samples were)."""
    events = run.events()
    if not any(isinstance(e, Sample) for e in events) and run.samples_path.exists():
        text = run.samples_path.read_text(encoding="utf-8", errors="replace")
        for m in re.finditer(r"(?m)^--- step (\d+) ---\n(.*?)(?=^--- step \d+ ---$|\Z)", text, re.S):
            events.append(Sample(int(m[1]), "", m[2].rstrip("\n"), False))
        events.sort(key=lambda e: getattr(e, "step", 0))
    return events
