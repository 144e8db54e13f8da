"""`moe-tui train --fork RUN[@STEP|@best]`: a new run that starts from a checkpoint of another one.

The fork takes the parent's model, optimizer moments and random streams at that checkpoint, and the
parent's settings as they were at that step; only the settings a live run may change can differ (the
flags given). With none changed, the fork continues exactly as the parent would have. The new run
records where it came from (fork.json, and a comment in its config.toml).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_core.config import LIVE_KEYS, Config
from moe_core.errors import UserError
from moe_core.events import SettingsChanged
from moe_core.store.checkpoint import read_manifest, step_checkpoints
from moe_core.store.runs import Run

SPEC = re.compile(r"^(?P<run>[^@]+?)(?:@(?P<at>best|\d+))?$")


@dataclass(frozen=True)
class Fork:
    parent: Run
    step: int
    checkpoint: Path  # the parent's checkpoint folder the fork starts from
    changed: dict[str, tuple[Any, Any]]  # key -> (the parent's value at `step`, the fork's)

    def start(self, run: Run) -> None:
        """Into the new run's folder (created already): the parent's checkpoint, checked against its
        manifest, and where it came from. On failure the new folder goes again."""
        target = run.checkpoints / f"step-{self.step:08d}"
        copying = target.with_name(f".tmp-{target.name}")
        try:
            shutil.copytree(self.checkpoint, copying)
            read_manifest(copying)  # whole: not pruned by a live parent half-way through
            copying.rename(target)
        except (OSError, UserError) as err:
            shutil.rmtree(run.path, ignore_errors=True)
            raise UserError(f"could not copy {self.checkpoint} into the fork {run.path} ({err}); fork again, "
                            "naming a checkpoint that stays (--fork RUN@STEP)") from None  # fmt: skip
        run.record_lineage(
            {
                "parent": self.parent.name,
                "step": self.step,
                "checkpoint": self.checkpoint.name,
                "changed": {k: list(v) for k, v in self.changed.items()},
            }  # fmt: skip
        )
        run.save_config(run.load_config())  # now with its origin in a comment


def plan_fork(spec: str, runs_dir: Path, settings: dict[str, Any]) -> tuple[Fork, Config]:
    """The fork `spec` names and the settings it trains with (the parent's at that step, then `settings`,
    which may hold live settings only)."""
    found = SPEC.match(spec.strip())
    if not found:
        raise UserError(f"--fork takes RUN, RUN@STEP or RUN@best, got {spec!r}")
    parent = Run.open(runs_dir, found["run"])
    checkpoint = _checkpoint(parent, found["at"])
    step = int(read_manifest(checkpoint)["step"])
    refused = sorted(k for k in settings if k not in LIVE_KEYS)
    if refused:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in refused)
        raise UserError(
            f"a fork keeps its parent's model, data and how it runs, so {flags} cannot change; a fork takes "
            f"--run-name and the live settings ({', '.join('--' + k.replace('_', '-') for k in LIVE_KEYS)})"
        )
    config = _settings_at(parent, checkpoint, step)
    changed = {k: (getattr(config, k), v) for k, v in settings.items() if getattr(config, k) != v}
    return Fork(parent, step, checkpoint, changed), dataclasses.replace(config, **settings)


def _settings_at(parent: Run, checkpoint: Path, step: int) -> Config:
    """The parent's settings as they were when it took its step after `step`: those its checkpoint
    recorded (every setting a resume may change), then the changes made at that very step."""
    config = parent.load_config()
    recorded = {k: v for k, v in read_manifest(checkpoint).get("config", {}).items() if hasattr(config, k)}
    at_step = {e.key: e.new for e in parent.events() if isinstance(e, SettingsChanged) and e.step == step}
    return dataclasses.replace(config, **recorded, **at_step)


def _checkpoint(parent: Run, at: str | None) -> Path:
    if at is None:
        return parent.checkpoint("latest")
    steps = step_checkpoints(parent.checkpoints)
    if at == "best":
        best = parent.checkpoint("best")
        same_step = [f for s, f in steps if s == read_manifest(best)["step"]]
        if not same_step:  # `best` keeps no optimizer moments: a fork needs the step checkpoint beside it
            raise UserError(
                f"run '{parent.name}' has no step checkpoint at its best step {read_manifest(best)['step']} (best "
                f"keeps the weights only); --fork one of its steps: {_listed(parent, steps)}"
            )
        return same_step[0]
    for step, folder in steps:
        if step == int(at):
            return folder
    raise UserError(f"run '{parent.name}' has no checkpoint at step {int(at)}; --fork one of {_listed(parent, steps)}")


def _listed(parent: Run, steps: list[tuple[int, Path]]) -> str:
    return ", ".join(f"{parent.name}@{step}" for step, _ in sorted(steps)) or "none (train it first)"
