"""Crash-safe writes (moe_core/atomic.py, checkpoint.py): the permissions a file gets, without touching the umask."""

from __future__ import annotations

import os
import stat

import torch

from moe_core.atomic import atomic_write_text
from moe_core.store.checkpoint import MANIFEST_FILE, MODEL_FILE, STATE_FILE, save_checkpoint


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


def test_every_file_of_a_checkpoint_gets_the_umasks_permissions(tmp_path):
    # safetensors writes the weights 0600: another user of a shared machine could not sample from them.
    previous = os.umask(0o022)
    try:
        folder = save_checkpoint(tmp_path / "step-00000010", {"w": torch.ones(2)}, {"step": 10}, {"step": 10})
    finally:
        os.umask(previous)
    assert {name: stat.S_IMODE((folder / name).stat().st_mode) for name in (MODEL_FILE, STATE_FILE, MANIFEST_FILE)} == {
        MODEL_FILE: 0o644,
        STATE_FILE: 0o644,
        MANIFEST_FILE: 0o644,
    }
