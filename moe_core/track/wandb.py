"""Weights & Biases: offline, into runs/NAME/wandb/, unless $WANDB_MODE is set or the user is logged in
(then online, as W&B users expect). `wandb sync` uploads an offline run later."""

from __future__ import annotations

import html
import netrc
import os
import secrets
from typing import Any
from urllib.parse import urlparse

from moe_core.events import State
from moe_core.track.base import Tracker


def logged_in() -> bool:
    """An API key in the environment, or in ~/.netrc for the W&B host (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandB(Tracker):
    name = package = "wandb"
    one_text_per_step = True

    def open(self, params: dict[str, Any], start_step: int, continuing: bool) -> None:
        import wandb

        mode = None if os.environ.get("WANDB_MODE") else ("online" if logged_in() else "offline")
        run_id = self.entry.get("run_id") or secrets.token_hex(6)  # a W&B run id: lowercase letters and digits
        settings = wandb.Settings(
            silent=True, console="off", x_disable_stats=True, save_code=False, x_save_requirements=False
        )
        self.wb = wandb.init(
            project=self.project,
            name=self.run.name,
            id=run_id,
            resume="allow",
            dir=str(self.run.path),
            config=params,
            mode=mode,
            settings=settings,
            reinit="create_new",
        )
        if continuing:
            self.wb.config.update(params, allow_val_change=True)
        self.entry.update(
            run_id=run_id,
            project=self.project,
            mode="offline" if self.wb.offline else "online",
            url="" if self.wb.offline else (self.wb.url or ""),
            dir=str((self.run.path / "wandb").resolve()),
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.wb.log(values, step=step)

    def text(self, step: int, key: str, text: str) -> None:
        import wandb

        self.wb.log({key: wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)  # as makeMoE logs its samples

    def alert(self, step: int, title: str, text: str) -> None:
        super().alert(step, title, text)  # in the run's history too: an offline run has no alerts to send
        if self.live_alerts and not self.wb.offline:  # an alert of the past pages nobody again
            self.wb.alert(title=title, text=text)

    def close(self, outcome: str) -> None:
        self.wb.finish(exit_code=1 if outcome == State.ERROR else 0)

    @classmethod
    def describe(cls, run, entry: dict[str, Any]) -> str:
        if entry.get("mode") == "online":
            return (
                f"run {entry.get('run_id', '?')} in project '{entry.get('project', '?')}', online at {entry.get('url')}"
            )
        folder = entry.get("dir", str(run.path / "wandb"))
        return (
            f"offline run {entry.get('run_id', '?')} (project '{entry.get('project', '?')}') in {folder}; look "
            f"with `wandb leet {folder}`, upload with `wandb sync {folder}/offline-run-*`"
        )


TRACKER = WandB
