"""Settings a run takes while it trains, between two steps: those that leave the model's shape and its
data alone (`moe-tui set RUN lr=1e-3`, the dashboard's settings dialog).

A change is checked as `moe-tui train` would check the flag, applied by every rank between the same two
steps, logged as a `SettingsChanged` event (metrics.jsonl, viewers, trackers) and written to the run's
config.toml, so that a resume goes on with it. A resume from a checkpoint taken before a change makes
it again at the step it was first made (`pending_after`), so the run ends as if never interrupted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moe_core.config import LIVE_KEYS, Config, validate
from moe_core.errors import UserError
from moe_core.events import Event, SettingsChanged

_TYPES = {f.name: f.type for f in dataclasses.fields(Config)}


def parse_assignments(assignments: list[str]) -> dict[str, str]:
    """`["lr=1e-3", "dropout=0.1"]` -> {"lr": "1e-3", "dropout": "0.1"}; the values stay text."""
    changes: dict[str, str] = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not value.strip():
            raise UserError(f"'{assignment}' is not KEY=VALUE; write e.g. lr=1e-3, KEY one of {', '.join(LIVE_KEYS)}")
        changes[key] = value.strip()
    return changes


def checked_changes(config: Config, raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` (text or numbers) as typed values that differ from `config`, refused with one clear line where
    a key is unknown, changes the model's shape or data, or has a value `moe-tui train` would refuse."""
    changes = {}
    for key, value in raw.items():
        if key not in _TYPES:
            raise UserError(f"unknown setting '{key}'; a live run takes one of {', '.join(LIVE_KEYS)}")
        if key not in LIVE_KEYS:
            raise UserError(
                f"{key} cannot change while the run trains (it changes the model's shape, its data or how it "
                f"runs); a live run takes one of {', '.join(LIVE_KEYS)}; for another {key}, start a new run"
            )
        changes[key] = _typed(key, value)
    validate(dataclasses.replace(config, **changes))
    return {k: v for k, v in changes.items() if v != getattr(config, k)}


def _typed(key: str, value: Any) -> int | float:
    kind = int if _TYPES[key] in (int, "int") else float
    if isinstance(value, bool):
        raise UserError(f"{key} takes a number (as --{key.replace('_', '-')} does), got {value!r}")
    try:
        number = kind(value) if not isinstance(value, str) or kind is float else int(value, 10)
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        raise UserError(f"{key} takes {what} (as --{key.replace('_', '-')} does), got {value!r}") from None
    if kind is int and isinstance(value, float) and number != value:
        raise UserError(f"{key} takes a whole number (as --{key.replace('_', '-')} does), got {value!r}")
    return number


def pending_after(step: int, events: list[Event], config: Config) -> tuple[dict[str, Any], list[SettingsChanged]]:
    """On a resume from the checkpoint at `step`: the settings changed after it (logged, then cut from the
    log by the rewind) are made again at their steps. Returns the values in effect at `step` for those
    keys, and the changes to make. A key the resume itself sets anew (a flag that differs from the last
    logged value) is left to the flag."""
    later = [e for e in events if isinstance(e, SettingsChanged) and e.step > step and e.key in LIVE_KEYS]
    at_step, pending = {}, []
    for key in dict.fromkeys(e.key for e in later):
        changes = [e for e in later if e.key == key]
        if changes[-1].new != getattr(config, key):  # set again by a flag on this resume: the flag wins
            continue
        at_step[key] = changes[0].old
        pending += changes
    return at_step, sorted(pending, key=lambda e: e.step)
