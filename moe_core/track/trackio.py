"""Trackio (Hugging Face, local-first): into its own local store ($TRACKIO_DIR, default
~/.cache/huggingface/trackio), one project database with a run per moe-tui run; `trackio show` opens it.
A resume continues the run of the same name (Trackio's resume="allow"); a new moe-tui run of a name
used before is a new Trackio run of that name (resume="never")."""

from __future__ import annotations

import contextlib
import io
from typing import Any

from moe_core.track.base import Tracker


class Trackio(Tracker):
    name = package = "trackio"

    def open(self, params: dict[str, Any], start_step: int, continuing: bool) -> None:
        import trackio
        from trackio.utils import TRACKIO_DIR

        with contextlib.redirect_stdout(io.StringIO()):  # its greeting would land on the dashboard's screen
            self.tr = trackio.init(
                project=self.project,
                name=self.run.name,
                config=params,
                resume="allow" if continuing else "never",
                auto_log_cpu=False,
                auto_log_gpu=False,
            )
        self.entry.update(project=self.project, run=self.run.name, run_id=self.tr.id, dir=str(TRACKIO_DIR))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.tr.log(values, step=step)

    def text(self, step: int, key: str, text: str) -> None:
        import trackio

        self.tr.log({key: trackio.Markdown("```\n" + text + "\n```")}, step=step)

    def close(self, outcome: str) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self.tr.finish()

    @classmethod
    def describe(cls, run, entry: dict[str, Any]) -> str:
        return (
            f"run '{entry.get('run', run.name)}' of project '{entry.get('project', '?')}' in {entry.get('dir', '?')}; "
            f"open with `trackio show --project {entry.get('project', '?')}`"
        )


TRACKER = Trackio
