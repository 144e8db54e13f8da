"""Checkpoints that load without running code and survive a crash mid-write.

A checkpoint is a folder: `model.safetensors` (weights), `state.pt` (optimizer, step, RNG: tensors
and plain values only, read with `torch.load(weights_only=True)`), and `manifest.json` (step, config
hash, each file's size and sha256). It is written to a temporary folder and renamed into place, so a
folder with a manifest is always whole; the manifest is checked again on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_core.atomic import fsync_dir, usual_file_mode
from moe_core.errors import UserError

if TYPE_CHECKING:
    import torch

MODEL_FILE, STATE_FILE, MANIFEST_FILE = "model.safetensors", "state.pt", "manifest.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    folder: Path, model_state: dict[str, torch.Tensor], train_state: dict[str, Any], manifest: dict[str, Any]
) -> Path:
    """Write a checkpoint folder atomically, replacing any folder of the same name."""
    import torch  # here, not at the top: `moe-tui runs` reads manifests without torch
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / MODEL_FILE)
            os.chmod(tmp / MODEL_FILE, usual_file_mode())  # safetensors makes it 0600: others could not sample
            torch.save(train_state, tmp / STATE_FILE)
        except (SafetensorError, RuntimeError) as err:  # how both report a full disk: make it an OSError
            raise OSError(str(err).splitlines()[0]) from err
        files = {}
        for name in (MODEL_FILE, STATE_FILE):
            _fsync_file(tmp / name)
            files[name] = {"size": (tmp / name).stat().st_size, "sha256": file_digest(tmp / name)}
        (tmp / MANIFEST_FILE).write_text(json.dumps({**manifest, "files": files}, indent=1))
        _fsync_file(tmp / MANIFEST_FILE)
        fsync_dir(tmp)
        old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


class CorruptCheckpoint(UserError):
    """A checkpoint whose files do not match its manifest. `reason` says what is wrong, without the
    advice, for callers that go on to an older checkpoint."""

    def __init__(self, folder: Path, problem: str):
        self.reason = f"checkpoint {folder} {problem}"
        super().__init__(f"{self.reason}; resume from an earlier checkpoint")


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest, after checking every file against it; CorruptCheckpoint names what is wrong."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CorruptCheckpoint(folder, f"is incomplete (no {MANIFEST_FILE})") from None
    except (ValueError, KeyError, TypeError):
        raise CorruptCheckpoint(folder, f"has a corrupt {MANIFEST_FILE}") from None
    for name in (MODEL_FILE, STATE_FILE):
        path, want = folder / name, files.get(name, {})
        if not path.is_file() or path.stat().st_size != want.get("size") or file_digest(path) != want.get("sha256"):
            raise CorruptCheckpoint(folder, f"is corrupt ({name} does not match its manifest)")
    return manifest


def load_checkpoint(
    folder: Path, verify: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Weights, trainer state and manifest. Never unpickles objects: a pickled payload is refused.
    `verify=False` skips hashing the files, for a folder that `read_manifest` has just checked."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    manifest = read_manifest(folder) if verify else json.loads((folder / MANIFEST_FILE).read_text())
    try:
        weights = load_file(folder / MODEL_FILE)
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(
            f"checkpoint {folder}: {MODEL_FILE} is not a valid safetensors file ({err}); "
            "resume from an earlier checkpoint"
        ) from None
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol before refusing
            warnings.simplefilter("ignore")
            state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"it asks to call {found[1]}" if found else "it is not plain tensors and values"
        raise UserError(
            f"checkpoint {folder}: {STATE_FILE} was refused without running it ({what}); only "
            "load checkpoints you trust, made by moe-tui"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise UserError(
            f"checkpoint {folder}: {STATE_FILE} cannot be read ({err}); resume from an earlier checkpoint"
        ) from None
    return weights, state, manifest


def step_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Step checkpoint folders under `root`, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def newest_intact(root: Path) -> tuple[Path | None, list[str]]:
    """The newest step checkpoint whose files match its manifest, and what was wrong with newer ones."""
    problems = []
    for _, folder in step_checkpoints(root):
        try:
            read_manifest(folder)
            return folder, problems
        except CorruptCheckpoint as err:
            problems.append(err.reason)
    return None, problems


def _set_aside_name(leftover: Path) -> str:
    """NAME of a `.old-NAME-PID` folder: the previous NAME, set aside while a new one is renamed in."""
    return leftover.name[len(".old-") :].rsplit("-", 1)[0]


def restore_set_aside(root: Path) -> list[str]:
    """Put back `.old-NAME-PID` folders whose NAME is missing: a crash between the two renames of a
    replace leaves the previous checkpoint there, whole. Returns the names restored."""
    restored = []
    for leftover in sorted(root.glob(".old-*")) if root.is_dir() else []:
        name = _set_aside_name(leftover)
        if not (root / name).exists():
            os.replace(leftover, root / name)
            restored.append(name)
    return restored


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` step checkpoints (plus `best`), and clear leftovers of crashed writes."""
    for _, folder in step_checkpoints(root)[keep:]:
        # Renamed out of the way first: a crash in the middle of deleting it must not leave a
        # step-N folder with half its files, which would read as a corrupt checkpoint.
        doomed = folder.with_name(f".del-{folder.name}-{os.getpid()}")
        os.replace(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    for leftover in [*root.glob(".tmp-*"), *root.glob(".del-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in root.glob(".old-*"):
        # A crash before the new NAME was renamed in leaves this the only copy: it goes only once
        # NAME is back in place.
        if (root / _set_aside_name(leftover)).is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
