"""Crash-safe writes (moe_core/atomic.py): the permissions a file gets, without touching the umask."""

from __future__ import annotations

import os
import stat

from moe_core.atomic import atomic_write_text


def test_a_written_file_gets_the_umasks_permissions_and_the_umask_is_never_swapped(tmp_path, monkeypatch):
    # Swapping the umask to read it (os.umask(0), then back) would, for that moment, give the files
    # other threads create (the trackers' own) the wrong permissions: on Linux it is read, not swapped.
    swaps = []
    real_umask = os.umask
    previous = real_umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: swaps.append(mask) or real_umask(mask))
        atomic_write_text(tmp_path / "config.json", "{}")
    finally:
        real_umask(previous)
    assert swaps == []
    assert stat.S_IMODE((tmp_path / "config.json").stat().st_mode) == 0o640
    assert (tmp_path / "config.json").read_text() == "{}"
