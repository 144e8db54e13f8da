"""Training text: named corpora (downloaded once, sha256-checked), URLs, local files, CSV columns.

Every problem the user can fix raises `UserError` with a one-line message. Downloads go to a
temporary file next to the target and are renamed into place only when complete (and verified),
so an interrupted or failed download never leaves a partial file behind.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import http.client
import io
import itertools
import logging
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from moe_core.errors import UserError

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int | None], None]
"""Download progress: (bytes_done, total_bytes or None when the server does not say)."""

_CHUNK = 64 * 1024
# Errors that mean "the network or the server failed" (URLError and timeouts are OSErrors;
# IncompleteRead is not).
_NETWORK_ERRORS = (OSError, http.client.HTTPException)


@dataclass(frozen=True)
class NamedCorpus:
    name: str
    filename: str
    url: str
    sha256: str
    size: int
    description: str


CORPORA: dict[str, NamedCorpus] = {
    c.name: c
    for c in (
        NamedCorpus(
            name="shakespeare",
            filename="tinyshakespeare.txt",
            url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            size=1115394,
            description="Tiny Shakespeare (Karpathy), 40,000 lines of plays",
        ),
        NamedCorpus(
            name="simpsons",
            filename="moes_tavern_lines.txt",
            url="https://raw.githubusercontent.com/udacity/deep-learning/master/"
            "tv-script-generation/data/simpsons/moes_tavern_lines.txt",
            sha256="44eaf379f2368165d52d395329d0c639ef1a0036d5b7e2c0f0d3acfd657d7ed4",
            size=305284,
            description="The Simpsons: script lines from Moe's Tavern",
        ),
    )
}


@dataclass(frozen=True)
class Corpus:
    name: str  # label for run names: the corpus name, a file's stem, or a URL's file stem
    source: str  # what the user passed (name, path or URL), for the run config
    text: str


def default_data_dir() -> Path:
    """Where named corpora and downloaded URLs are cached: $MOE_TUI_DATA, else ./data."""
    env = os.environ.get("MOE_TUI_DATA", "")
    return Path(env) if env else Path("data")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def named_corpus_status(data_dir: Path) -> list[tuple[NamedCorpus, Path, bool]]:
    """For each named corpus: (corpus, where it is expected, whether it is there with the right hash)."""
    result = []
    for corpus in CORPORA.values():
        path = data_dir / corpus.filename
        result.append((corpus, path, path.is_file() and file_sha256(path) == corpus.sha256))
    return result


# --------------------------------------------------------------------------------------------
# Loading


def load_corpus(
    source: str,
    data_dir: Path,
    *,
    columns: Sequence[str] = (),
    encoding: str = "utf-8",
    progress: ProgressFn | None = None,
    timeout: float = 30.0,
) -> Corpus:
    """Resolve `source` (corpus name, http(s) URL or local path) to a file and read its text."""
    _check_encoding(encoding)  # before any download, so a typo does not cost a download
    if source in CORPORA:
        path, name = _fetch_named(CORPORA[source], data_dir, progress, timeout), source
    elif source.startswith(("http://", "https://")):
        path, name = _fetch_url(source, data_dir, progress, timeout)
    else:
        path = _local_path(source)
        name = path.stem
    text = _read_text(path, encoding)
    text = _csv_lines(text, columns, path) if columns else text.replace("\r\n", "\n")
    if not text.strip():
        what = f"no CSV row has text in all of {_quoted(columns)}" if columns else "it has no text"
        raise UserError(f"{path} is empty: {what}; pick a file (or columns) with some text in it")
    return Corpus(name=name, source=source, text=text)


def _check_encoding(encoding: str) -> None:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise UserError(
            f"unknown text encoding {encoding!r}: pass a Python codec name such as utf-8 or latin-1"
        ) from None


def _local_path(source: str) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        raise UserError(f"dataset '{source}' is a directory: pass a text file inside it instead")
    if not path.is_file():
        raise UserError(
            f"dataset '{source}' not found: use one of {', '.join(CORPORA)}, a path to a text file, or an http(s) URL"
        )
    return path


def _read_text(path: Path, encoding: str) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}); check the file's permissions") from None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not valid {encoding} text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "pass --encoding (e.g. --encoding latin-1) or convert the file to UTF-8"
        ) from None
    # A byte-order mark is not text: it would become a vocab char (or spoil a CSV header).
    return text.removeprefix("\ufeff")


def _csv_lines(text: str, columns: Sequence[str], path: Path) -> str:
    """One line per CSV row: the chosen columns' values joined by ': ' (e.g. 'Homer Simpson: Hi')."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    lines = []
    try:
        available = reader.fieldnames or []  # reads the header row
        missing = [c for c in columns if c not in available]
        if missing:
            raise UserError(
                f"{path} has no column {_quoted(missing)}; available columns: {_quoted(available) or '(none)'}"
            )
        for row in reader:
            # Short rows give None; a quoted value may span lines, but a row must stay one line.
            values = [" ".join((row.get(c) or "").split()) for c in columns]
            if all(values):
                lines.append(": ".join(values))
    except csv.Error as e:
        raise UserError(
            f"{path} is not valid CSV (line {reader.line_num}: {e}); fix the file or drop --column"
        ) from None
    return "\n".join(lines) + "\n" if lines else ""


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names)


# --------------------------------------------------------------------------------------------
# Downloading


class _NetworkError(Exception):
    """The server or the network failed (as opposed to the local disk)."""


def _fetch_named(corpus: NamedCorpus, data_dir: Path, progress: ProgressFn | None, timeout: float) -> Path:
    path = data_dir / corpus.filename
    stale_note = ""
    if path.is_file():
        got = file_sha256(path)
        if got == corpus.sha256:
            return path  # cached and verified: no network at all
        # Keep the user's file until a good copy has arrived; os.replace swaps it only on success.
        stale_note = (
            f"; the file already at {path.resolve()} has sha256 {got[:12]}… "
            f"(expected {corpus.sha256[:12]}…) and is kept until a re-download succeeds"
        )
        log.warning("%s has the wrong sha256 (%s…); re-downloading %s", path, got[:12], corpus.url)
    _download(
        corpus.url,
        path,
        label=f"{corpus.name} from {corpus.url}",
        hint=f"(sha256 {corpus.sha256[:12]}…) or set MOE_TUI_DATA to a folder that has it",
        expected_sha256=corpus.sha256,
        note=stale_note,
        progress=progress,
        timeout=timeout,
    )
    if stale_note:
        log.warning("re-downloaded %s: it now has the expected sha256", path)
    return path


def _fetch_url(url: str, data_dir: Path, progress: ProgressFn | None, timeout: float) -> tuple[Path, str]:
    basename = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or "download.txt"
    basename = re.sub(r"[^A-Za-z0-9._-]", "_", basename)  # a safe file name on every OS
    url_hash = hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]
    path = data_dir / "urls" / f"{url_hash}-{basename}"
    if not path.is_file():  # URLs have no known hash: a cached copy is trusted as is
        hint = "or pass the path of a local copy instead"
        _download(url, path, label=url, hint=hint, progress=progress, timeout=timeout)
    return path, Path(basename).stem


def _download(
    url: str,
    target: Path,
    *,
    label: str,
    hint: str,
    progress: ProgressFn | None,
    timeout: float,
    expected_sha256: str | None = None,
    note: str = "",
) -> None:
    """Download `url` to `target` atomically: temp file in the same folder, fsync, verify, rename."""
    # The folders made for it below (urls/, or the data folder itself) are removed again if it fails.
    made = list(itertools.takewhile(lambda p: not p.exists(), (target.parent, *target.parent.parents)))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".part", delete=False)
    except OSError as e:
        raise UserError(f"cannot write to {target.parent} ({e}); set MOE_TUI_DATA to a writable folder") from None
    tmp_path = Path(tmp.name)
    try:
        with tmp:
            got = _stream(url, tmp, progress, timeout)
            tmp.flush()
            os.fsync(tmp.fileno())  # the bytes are on disk before the rename makes them visible
        if expected_sha256 is not None and got != expected_sha256:
            raise UserError(
                f"download from {url} has the wrong sha256: expected {expected_sha256[:12]}…, "
                f"got {got[:12]}…; try again later or put the right file at {target.resolve()}{note}"
            )
        os.replace(tmp_path, target)
    except _NetworkError as e:
        # An HTTP status means the server answered: the URL, not the connection, is the problem.
        verb = "check the URL or" if isinstance(e.__cause__, urllib.error.HTTPError) else "offline?"
        raise UserError(
            f"cannot download {label} ({e}); {verb} put the file at {target.resolve()} {hint}{note}"
        ) from None
    except OSError as e:  # the network errors were turned into _NetworkError: this is the disk
        raise UserError(
            f"cannot write {target} ({e}); free some space or set MOE_TUI_DATA to a writable folder"
        ) from None
    finally:
        # Whatever happened (including Ctrl-C), no partial file stays behind, nor an empty folder.
        tmp_path.unlink(missing_ok=True)
        for folder in made if not target.exists() else ():
            try:
                folder.rmdir()
            except OSError:
                break


def _stream(url: str, out: BinaryIO, progress: ProgressFn | None, timeout: float) -> str:
    """Copy the response body to `out` chunk by chunk; return its sha256. Raises _NetworkError."""
    request = urllib.request.Request(url, headers={"User-Agent": "moe-tui"})
    digest = hashlib.sha256()
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except _NETWORK_ERRORS as e:
        raise _NetworkError(_reason(e)) from e
    with response:
        total = _content_length(response)
        done = 0
        if progress:
            progress(done, total)
        while True:
            try:
                chunk = response.read(_CHUNK)
            except _NETWORK_ERRORS as e:
                raise _NetworkError(_reason(e)) from e
            if not chunk:
                break
            out.write(chunk)  # disk errors stay OSError
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    if total is not None and done != total:
        raise _NetworkError(f"connection closed after {done} of {total} bytes")
    return digest.hexdigest()


def _content_length(response: object) -> int | None:
    value = getattr(response, "headers", {}).get("Content-Length")
    return int(value) if value and value.isdigit() else None


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e) or type(e).__name__
