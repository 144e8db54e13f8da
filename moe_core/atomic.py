"""Crash-safe writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Callable


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, usual_file_mode())  # mkstemp makes 0600; give the file the usual permissions
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def usual_file_mode() -> int:
    """The permissions `open()` gives a new file here: 0666 less the umask (0644 for most users)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read without setting it where Linux shows it: `os.umask` can only swap
    it, and for that moment every file another thread creates (a tracker's, say) would be world-writable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_SWAP:
        mask = os.umask(0o077)  # the most private mask for the moment it is swapped
        os.umask(mask)
    return mask


_UMASK_SWAP = threading.Lock()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
