"""The commands that messages tell a user to run next, composed in one place: every hint for a run
keeps its --runs-dir (unless it is the default), and a resume keeps the run's --nproc and
--expert-parallel, so that what a message suggests runs the same run again."""

from __future__ import annotations

from pathlib import Path

from moe_core.store.runs import default_runs_dir


def runs_dir_flag(runs_dir: Path) -> str:
    return "" if Path(runs_dir) == default_runs_dir() else f" --runs-dir {runs_dir}"


def resume_command(name: str, runs_dir: Path, nproc: int = 1, expert_parallel: bool = False) -> str:
    """`moe-tui train --resume NAME`, on as many processes as the run had."""
    return (
        f"moe-tui train --resume {name}{runs_dir_flag(runs_dir)}"
        + (f" --nproc {nproc}" if nproc > 1 else "")
        + (" --expert-parallel" if expert_parallel else "")
    )


def sample_command(name: str, runs_dir: Path) -> str:
    return f"moe-tui sample {name}{runs_dir_flag(runs_dir)}"


def watch_command(name: str, runs_dir: Path) -> str:
    return f"moe-tui watch {name}{runs_dir_flag(runs_dir)}"


def stop_command(name: str, runs_dir: Path) -> str:
    return f"moe-tui stop {name}{runs_dir_flag(runs_dir)}"
