"""A run folder: config, vocabulary, metrics log, samples and checkpoints of one training run.

runs/<name>/
    config.toml       the resolved config, human-readable
    vocab.json        the character vocabulary
    metrics.jsonl     one JSON object per event
    samples.txt       generated text, tagged with its step
    checkpoints/      step-NNNNNNNN/ (the newest K) and best/
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from moe_core.atomic import atomic_write_text
from moe_core.config import Config, read_toml, write_toml
from moe_core.data.vocab import Vocab
from moe_core.errors import UserError
from moe_core.events import Event, from_line
from moe_core.store.checkpoint import newest_intact, read_manifest, step_checkpoints


def default_runs_dir() -> Path:
    return Path(os.environ.get("MOE_TUI_RUNS") or "runs")


def check_run_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or ".." in name or name.startswith("."):
        raise UserError(
            f"bad run name {name!r}: use letters, digits, '-', '_' or '.', with no path "
            "separators or '..' (e.g. --run-name shakespeare-small)"
        )
    if any(ch.isspace() or not ch.isprintable() for ch in name):
        raise UserError(f"bad run name {name!r}: no spaces or control characters (e.g. --run-name shakespeare-small)")
    return name


@dataclass
class Run:
    path: Path
    # The last metrics write failed (disk full): it may have left half a line, and front ends warn once.
    log_failing: bool = field(default=False, init=False, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.path.name

    config_path = property(lambda self: self.path / "config.toml")
    vocab_path = property(lambda self: self.path / "vocab.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    samples_path = property(lambda self: self.path / "samples.txt")
    checkpoints = property(lambda self: self.path / "checkpoints")
    best_checkpoint = property(lambda self: self.path / "checkpoints" / "best")

    @classmethod
    def prepare(cls, runs_dir: Path, name: str, overwrite: bool) -> "Run":
        """Check that a new run may take this name; writes nothing (see `initialise`)."""
        path = Path(runs_dir) / check_run_name(name)
        if Path(runs_dir).exists() and not Path(runs_dir).is_dir():
            raise UserError(f"the runs folder {runs_dir} is a file, not a folder; pass --runs-dir with a folder")
        if path.exists() and not overwrite:
            raise UserError(
                f"run '{name}' already exists in {runs_dir}; continue it with "
                f"--resume {name}, or start afresh with --overwrite"
            )
        return cls(path)

    def initialise(self, config: Config, vocab: Vocab, replace: bool = False) -> None:
        """Create the run folder (with `replace`, replacing an old one, once everything else has been
        checked). A folder that appeared since `prepare` (another launch of the same name) is refused."""
        try:
            if replace and self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True)
            self.save_config(config)
            atomic_write_text(self.vocab_path, vocab.to_json())
        except FileExistsError:
            raise UserError(
                f"run '{self.name}' was created by another command just now; pick another --run-name"
            ) from None
        except OSError as err:
            raise UserError(
                f"cannot create the run folder {self.path} ({err.strerror or err}); pass --runs-dir "
                "with a folder you can write to"
            ) from None

    @classmethod
    def open(cls, runs_dir: Path, name: str) -> "Run":
        path = Path(runs_dir) / check_run_name(name)
        if path.is_dir() and not (path / "config.toml").is_file():
            raise UserError(
                f"{path} is a folder but not a moe-tui run (it has no config.toml); see `moe-tui runs` "
                "for the runs there, or pass --runs-dir"
            )
        if not (path / "config.toml").is_file():
            known = ", ".join(sorted(list_run_names(runs_dir))[:8]) or "none yet"
            raise UserError(
                f"no run '{name}' in {Path(runs_dir).resolve()} (runs: {known}); see `moe-tui runs` or pass --runs-dir"
            )
        return cls(path)

    def save_config(self, config: Config) -> None:
        lineage = self.lineage()
        origin = f"forked from run {lineage['parent']} at step {lineage['step']}" if lineage else ""
        write_toml(config, self.config_path, origin)

    lineage_path = property(lambda self: self.path / "fork.json")

    def record_lineage(self, lineage: dict[str, Any]) -> None:
        """Where a forked run came from: its parent, the step, the settings it changed."""
        atomic_write_text(self.lineage_path, json.dumps(lineage, indent=1) + "\n")

    def lineage(self) -> dict[str, Any] | None:
        """The fork's parent, step and changed settings; None for a run trained from scratch."""
        try:
            return json.loads(self.lineage_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def load_config(self) -> Config:
        return Config(**read_toml(self.config_path))

    def load_vocab(self) -> Vocab:
        try:
            return Vocab.from_json(self.vocab_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UserError):
            raise UserError(
                f"run '{self.name}': {self.vocab_path} is missing or corrupt, and the run cannot be "
                "used without it; restore the file, or start afresh with --overwrite"
            ) from None

    # -- metrics -------------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        if self.log_failing:  # end the half line the failed write may have left
            line = "\n" + line
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError:
            self.log_failing = True
            raise
        self.log_failing = False

    def events(self) -> list[Event]:
        """The events logged so far, in order: what the charts, the report, an export and a resumed
        run's trackers replay. Torn lines, and lines of kinds this version does not know, are skipped."""
        return [event for line, _ in self._metric_lines() if (event := from_line(line)) is not None]

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every intact line; a torn last line (a crash mid-write) is skipped."""
        return [record for _, record in self._metric_lines() if record is not None]

    def _metric_lines(self) -> list[tuple[str, dict[str, Any] | None]]:
        """Each line of metrics.jsonl with its record, or None where the line is torn."""
        if not self.metrics_path.exists():
            return []
        lines = []
        for line in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                lines.append((line, json.loads(line)))
            except ValueError:
                lines.append((line, None))
        return lines

    def rewind(self, step: int) -> int:
        """Drop metrics and samples after `step`, and torn metric lines, so that a run resumed from
        the checkpoint at `step` has no duplicated or phantom steps. Returns the lines dropped. Settings
        changed later stay: the resumed run makes them again at their steps, however often it is resumed."""
        lines = self._metric_lines()
        kept = [
            line
            for line, record in lines
            if record is not None and ((record.get("step") or 0) <= step or record.get("event") == "SettingsChanged")
        ]
        if len(kept) != len(lines):
            atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))
        if self.samples_path.exists():
            text = self.samples_path.read_text(encoding="utf-8", errors="replace")
            blocks = re.split(r"(?m)^(?=--- step \d+ ---$)", text)
            kept_blocks = [b for b in blocks if not (m := re.match(r"--- step (\d+) ---", b)) or int(m[1]) <= step]
            if len(kept_blocks) != len(blocks):
                atomic_write_text(self.samples_path, "".join(kept_blocks))
        self.log_failing = False
        return len(lines) - len(kept)

    def append_sample(self, step: int, text: str) -> None:
        with open(self.samples_path, "a", encoding="utf-8") as f:
            f.write(f"--- step {step} ---\n{text}\n\n")

    # -- checkpoints ---------------------------------------------------------------------------

    def checkpoint(self, which: str = "latest", on_skip: Callable[[str], None] | None = None) -> Path:
        """The folder of `which`: the newest intact step checkpoint ("latest"), `best` or "step-N", checked
        against its manifest; `on_skip` hears of each newer checkpoint passed over, and why."""
        if which == "best":
            if not self.best_checkpoint.is_dir():
                raise UserError(
                    f"run '{self.name}' has no best checkpoint yet (one is written at each "
                    "evaluation); use --checkpoint latest"
                )
            read_manifest(self.best_checkpoint)
            return self.best_checkpoint
        if re.fullmatch("step-[0-9]+", which):
            steps = step_checkpoints(self.checkpoints)
            for step, folder in steps:
                if step == int(which[5:]):
                    read_manifest(folder)
                    return folder
            listed = ", ".join(f"step-{step}" for step, _ in sorted(steps)) or "none (train it first)"
            raise UserError(
                f"run '{self.name}' has no checkpoint {which}; use --checkpoint best, latest or one of {listed}"
            )
        if which != "latest":
            raise UserError(f"unknown checkpoint '{which}'; use --checkpoint latest, best or step-N (e.g. step-500)")
        folder, problems = newest_intact(self.checkpoints)
        if folder is None and problems:
            raise UserError(
                f"run '{self.name}' has no intact checkpoint (the newest: {problems[0]}); start afresh with --overwrite"
            )
        if folder is None:
            raise UserError(f"run '{self.name}' has no checkpoint yet; train it first or start afresh with --overwrite")
        for problem in problems if on_skip else []:
            on_skip(f"skipped: {problem}; using {folder.name}, the newest intact one")
        return folder

    def summary(self) -> dict[str, Any]:
        """Name, dataset, step, best val loss, params and last update, for `moe-tui runs`."""
        info: dict[str, Any] = {
            "name": self.name,
            "dataset": "?",
            "step": 0,
            "best_val": None,
            "params": None,
            "active": None,
            "updated": None,
            "max_iters": None,
        }
        try:
            config = self.load_config()
            info.update(dataset=config.dataset, max_iters=config.max_iters)
        except UserError:
            pass
        for record in self.read_metrics():
            kind = record.get("event")
            info["step"] = max(info["step"], record.get("step", 0) or 0)
            if kind == "RunStarted":
                info.update(params=record["params_total"], active=record["params_active"])
            elif kind == "EvalMetrics":
                best = info["best_val"]
                info["best_val"] = record["val_loss"] if best is None else min(best, record["val_loss"])
        lineage = self.lineage()
        info["parent"] = f"{lineage['parent']}@{lineage['step']}" if lineage else None
        stamp = max((p.stat().st_mtime for p in self.path.rglob("*") if p.is_file()), default=None)
        info["updated"] = time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp else "-"
        return info


def list_run_names(runs_dir: Path) -> list[str]:
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    return sorted(p.name for p in runs_dir.iterdir() if (p / "config.toml").is_file())
