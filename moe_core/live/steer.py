"""Changing a live run's settings from outside its process (`moe-tui set RUN lr=1e-3`).

The change is checked here against the run's current settings (its config.toml), so that a mistake is
one clear line before anything is sent; sent over the control channel; and taken by the trainer between
two steps, which logs a `SettingsChanged` event per key. This waits for those in metrics.jsonl.
"""

from __future__ import annotations

import os
import time
from typing import Any

from moe_core.errors import UserError
from moe_core.events import Notice, SettingsChanged, from_line
from moe_core.hints import resume_command
from moe_core.live.client import TrainerGone, live_client
from moe_core.live.lease import read_status
from moe_core.store.runs import Run
from moe_core.train.settings import checked_changes

ANSWER_SECONDS = 60.0  # a trainer in the middle of an evaluation or a checkpoint answers after it


def change_settings(run: Run, raw: dict[str, Any], source: str) -> list[SettingsChanged]:
    """Ask the run's live trainer to take `raw` (KEY -> value) between two steps; the changes it made.
    Refused with a UserError: a key or value `moe-tui train` would refuse, a run that is not training, or
    one whose training failed."""
    changes = checked_changes(run.load_config(), raw)  # the input first: a mistake is said whatever the run does
    status = read_status(run)
    if status.state != "live":
        raise UserError(
            f"run '{run.name}' is not training ({status.describe()}); settings change on a live run; to go on "
            f"with new ones, resume it with them: `{resume_command(run.name, run.path.parent)} --lr ...`"
        )
    if not changes:
        return []
    client = live_client(run)
    if client is None:
        raise UserError(f"run '{run.name}' stopped just now; resume it with the new settings")
    try:
        if client.hello.get("state") == "error":
            raise UserError(
                f"run '{run.name}' failed at step {client.hello.get('step')}; its settings cannot change now; "
                f"resume it with the new ones: `{resume_command(run.name, run.path.parent)} --lr ...`"
            )
        offset = _log_size(run)
        client.send("set", changes=changes, source=source)
        reply = client.wait_for(lambda m: m.get("type") == "reply" and m.get("cmd") == "set", timeout=10)
        if reply is not None and not reply.get("ok"):
            raise UserError(reply.get("error", "the trainer refused the change"))
    except TrainerGone:
        raise UserError(
            f"run '{run.name}' stopped while the change was sent; resume it with the new settings"
        ) from None
    finally:
        client.close()
    return _wait_for_changes(run, offset, set(changes))


def _log_size(run: Run) -> int:
    try:
        return os.path.getsize(run.metrics_path)
    except OSError:
        return 0


def _wait_for_changes(run: Run, offset: int, keys: set[str]) -> list[SettingsChanged]:
    """The trainer's SettingsChanged events for `keys` logged after `offset`, or its refusal."""
    made: list[SettingsChanged] = []
    deadline = time.monotonic() + ANSWER_SECONDS
    while time.monotonic() < deadline:
        with open(run.metrics_path, "rb") as log:
            log.seek(offset)
            data = log.read()
        for event in (from_line(line) for line in data[: data.rfind(b"\n") + 1].splitlines()):
            if isinstance(event, Notice) and event.message.startswith("settings not changed"):
                raise UserError(event.message.removeprefix("settings not changed: "))
            if isinstance(event, SettingsChanged) and event.key in keys and event not in made:
                made.append(event)
        if {event.key for event in made} == keys:
            return made
        status = read_status(run)
        if status.state != "live":
            raise UserError(
                f"run '{run.name}' ended ({status.describe()}) before it took the change; resume it with the new "
                f"settings: `{resume_command(run.name, run.path.parent)} --lr ...`"
            )
        time.sleep(0.05)
    raise UserError(
        f"run '{run.name}' did not take the change within {ANSWER_SECONDS:.0f} s; it may be busy (an evaluation "
        "or a checkpoint): see `moe-tui watch`"
    )
