"""Tests for moe_core.data.corpus: corpora, downloads (against a local HTTP server only), files, Vocab."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import json
import shutil
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from moe_core.data import corpus as data
from moe_core.data.corpus import CORPORA, Corpus, file_sha256, load_corpus, named_corpus_status
from moe_core.data.vocab import Vocab
from moe_core.errors import UserError


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving a tmp folder: (base URL, folder)."""
    monkeypatch.setenv("no_proxy", "*")  # never send 127.0.0.1 through a proxy from the env
    monkeypatch.setenv("NO_PROXY", "*")
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # A short poll interval makes shutdown() quick (the default waits up to 0.5 s).
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connecting fails at once, like being offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/file.txt"


def _point_corpus_at(monkeypatch: pytest.MonkeyPatch, name: str, url: str) -> None:
    monkeypatch.setitem(CORPORA, name, dataclasses.replace(CORPORA[name], url=url))


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


# --------------------------------------------------------------------------------------------
# Named corpora


@pytest.mark.parametrize("name, vocab_size", [("shakespeare", 65), ("simpsons", 92)])
def test_named_corpus_loads_from_cache_without_network(shared_dir, no_network, name, vocab_size):
    corpus = load_corpus(name, shared_dir)
    assert corpus.name == name and corpus.source == name
    assert len(Vocab.from_text(corpus.text)) == vocab_size
    assert "\r" not in corpus.text


def test_named_corpus_metadata_matches_shared_files(shared_dir):
    for corpus in CORPORA.values():
        path = shared_dir / corpus.filename
        assert path.stat().st_size == corpus.size
        assert file_sha256(path) == corpus.sha256


def test_named_corpus_status(shared_dir, tmp_path):
    status = named_corpus_status(shared_dir)
    assert [(c.name, p, ok) for c, p, ok in status] == [
        ("shakespeare", shared_dir / "tinyshakespeare.txt", True),
        ("simpsons", shared_dir / "moes_tavern_lines.txt", True),
    ]
    (tmp_path / "tinyshakespeare.txt").write_text("not shakespeare")
    assert [ok for _, _, ok in named_corpus_status(tmp_path)] == [False, False]


def _tampered_copy(shared_dir: Path, data_dir: Path, name: str) -> Path:
    corpus = CORPORA[name]
    raw = bytearray((shared_dir / corpus.filename).read_bytes())
    raw[100] ^= 0x01
    data_dir.mkdir(exist_ok=True)
    target = data_dir / corpus.filename
    target.write_bytes(raw)
    return target


def test_tampered_cache_triggers_download_and_is_kept_when_offline(shared_dir, tmp_path, monkeypatch):
    target = _tampered_copy(shared_dir, tmp_path / "d", "shakespeare")
    bad = target.read_bytes()
    calls = []

    def offline(request, timeout):
        calls.append(request.full_url)
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError) as err:
        load_corpus("shakespeare", tmp_path / "d")
    assert calls == [CORPORA["shakespeare"].url]
    msg = str(err.value)
    assert "no route to host" in msg and "re-download" in msg and "\n" not in msg
    assert target.read_bytes() == bad  # the user's file is replaced only by a good download
    assert _files(tmp_path / "d") == [target]


def test_tampered_cache_is_replaced_by_good_download(shared_dir, tmp_path, server, monkeypatch):
    base, root = server
    shutil.copy(shared_dir / "moes_tavern_lines.txt", root / "moe.txt")
    _point_corpus_at(monkeypatch, "simpsons", f"{base}/moe.txt")
    target = _tampered_copy(shared_dir, tmp_path / "d", "simpsons")
    load_corpus("simpsons", tmp_path / "d")
    assert file_sha256(target) == CORPORA["simpsons"].sha256
    assert _files(tmp_path / "d") == [target]


def test_named_corpus_download_verifies_and_reports_progress(shared_dir, tmp_path, server, monkeypatch):
    base, root = server
    shutil.copy(shared_dir / "moes_tavern_lines.txt", root / "moe.txt")
    _point_corpus_at(monkeypatch, "simpsons", f"{base}/moe.txt")
    data_dir = tmp_path / "new" / "data"  # created only when the download starts
    seen: list[tuple[int, int | None]] = []

    corpus = load_corpus("simpsons", data_dir, progress=lambda done, total: seen.append((done, total)))

    size = CORPORA["simpsons"].size
    assert _files(data_dir) == [data_dir / "moes_tavern_lines.txt"]
    assert file_sha256(data_dir / "moes_tavern_lines.txt") == CORPORA["simpsons"].sha256
    assert len(Vocab.from_text(corpus.text)) == 92
    assert len(seen) > 2 and seen[-1] == (size, size)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_named_corpus_with_wrong_bytes_leaves_nothing(tmp_path, server, monkeypatch):
    base, root = server
    (root / "moe.txt").write_text("Moe_Szyslak: these are not the bytes you want\n")
    _point_corpus_at(monkeypatch, "simpsons", f"{base}/moe.txt")
    data_dir = tmp_path / "d"
    with pytest.raises(UserError) as err:
        load_corpus("simpsons", data_dir)
    msg = str(err.value)
    assert "sha256" in msg and f"{base}/moe.txt" in msg
    assert CORPORA["simpsons"].sha256[:12] in msg and "\n" not in msg
    assert _files(data_dir) == []  # no temp file, no target


def test_named_corpus_offline_names_absolute_path(tmp_path, closed_port_url, monkeypatch):
    _point_corpus_at(monkeypatch, "shakespeare", closed_port_url)
    data_dir = tmp_path / "d"
    with pytest.raises(UserError) as err:
        load_corpus("shakespeare", data_dir, timeout=5)
    msg = str(err.value)
    assert msg.startswith(f"cannot download shakespeare from {closed_port_url} (")
    assert str((data_dir / "tinyshakespeare.txt").resolve()) in msg
    assert "offline?" in msg and "MOE_TUI_DATA" in msg and "86c4e6aa9db7" in msg
    assert _files(data_dir) == []


def test_data_dir_not_created_when_cached(shared_dir, no_network, tmp_path):
    # Reading never creates folders: the shared dir is read-only and must stay untouched.
    before = _files(shared_dir)
    load_corpus("simpsons", shared_dir)
    assert _files(shared_dir) == before


# --------------------------------------------------------------------------------------------
# URL sources


def test_url_source_downloads_once_then_uses_cache(tmp_path, server, monkeypatch):
    base, root = server
    (root / "simpsons.txt").write_bytes(b"Homer: D'oh!\r\nMarge: Hmmm.\r\n")
    url = f"{base}/simpsons.txt"
    data_dir = tmp_path / "d"

    first = load_corpus(url, data_dir)
    assert first == Corpus(name="simpsons", source=url, text="Homer: D'oh!\nMarge: Hmmm.\n")
    cached = _files(data_dir / "urls")
    assert [p.name for p in cached] == [f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-simpsons.txt"]

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network used"))
    assert load_corpus(url, data_dir) == first


def test_url_without_basename_is_cached_as_download_txt(tmp_path, server):
    base, root = server
    (root / "index.html").write_text("hello from the root\n")
    corpus = load_corpus(f"{base}/", tmp_path)
    assert corpus.name == "download" and corpus.text == "hello from the root\n"
    assert [p.name[13:] for p in _files(tmp_path / "urls")] == ["download.txt"]


def test_url_http_error_leaves_nothing(tmp_path, server):
    base, _ = server
    with pytest.raises(UserError, match=r"HTTP 404.*check the URL") as err:
        load_corpus(f"{base}/missing.txt", tmp_path / "d")
    assert "\n" not in str(err.value)
    assert _files(tmp_path / "d" / "urls") == []


def test_url_offline_names_cache_path(tmp_path, closed_port_url):
    with pytest.raises(UserError) as err:
        load_corpus(closed_port_url, tmp_path / "d", timeout=5)
    msg = str(err.value)
    assert msg.startswith(f"cannot download {closed_port_url} (") and "offline?" in msg
    assert str((tmp_path / "d" / "urls").resolve()) in msg and "-file.txt" in msg
    assert _files(tmp_path / "d" / "urls") == []
    assert not (tmp_path / "d").exists()  # nor the folders made for the download


# --------------------------------------------------------------------------------------------
# Local files


def test_local_text_file(tmp_path, no_network):
    path = tmp_path / "my notes.txt"
    path.write_bytes(b"\xef\xbb\xbfline one\r\nline two\n")  # BOM and CRLF
    corpus = load_corpus(str(path), tmp_path / "unused")
    assert corpus == Corpus(name="my notes", source=str(path), text="line one\nline two\n")
    assert not (tmp_path / "unused").exists()


def test_local_path_expands_user(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "t.txt").write_text("hi\n")
    assert load_corpus("~/t.txt", tmp_path).text == "hi\n"


CSV = (
    "raw_character_text,spoken_words,episode\n"
    "Homer Simpson,Hi Moe,1\n"
    "Moe Szyslak,,1\n"  # empty value: skipped
    "   ,Who said this?,2\n"  # whitespace-only value: skipped
    'Moe Szyslak,"Hey, Homer.\nWhat\'ll it be?",2\n'  # quoted comma and newline
    "Barney Gumble\n"  # short row: skipped
)


def test_csv_columns_joined_and_empty_rows_skipped(tmp_path):
    path = tmp_path / "lines.csv"
    path.write_text(CSV)
    corpus = load_corpus(str(path), tmp_path, columns=["raw_character_text", "spoken_words"])
    assert corpus.name == "lines"
    assert corpus.text.splitlines() == ["Homer Simpson: Hi Moe", "Moe Szyslak: Hey, Homer. What'll it be?"]


def test_csv_single_column_and_crlf(tmp_path):
    path = tmp_path / "lines.csv"
    path.write_bytes(CSV.replace("\n", "\r\n").encode())
    corpus = load_corpus(str(path), tmp_path, columns=["spoken_words"])
    assert corpus.text == "Hi Moe\nWho said this?\nHey, Homer. What'll it be?\n"


def test_csv_without_columns_is_plain_text(tmp_path):
    path = tmp_path / "lines.csv"
    path.write_text(CSV)
    assert load_corpus(str(path), tmp_path).text == CSV


def test_csv_unknown_column_lists_available(tmp_path):
    path = tmp_path / "lines.csv"
    path.write_text(CSV)
    with pytest.raises(UserError) as err:
        load_corpus(str(path), tmp_path, columns=["character", "spoken_words"])
    msg = str(err.value)
    assert "'character'" in msg and "'raw_character_text', 'spoken_words', 'episode'" in msg


def test_csv_with_no_usable_rows_is_empty(tmp_path):
    path = tmp_path / "lines.csv"
    path.write_text("a,b\n1,\n,2\n")
    with pytest.raises(UserError, match="is empty"):
        load_corpus(str(path), tmp_path, columns=["a", "b"])


def test_non_utf8_file_needs_encoding(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("Caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(UserError) as err:
        load_corpus(str(path), tmp_path)
    msg = str(err.value)
    assert f"{path} is not valid utf-8 text (byte 0xe9 at offset 3)" in msg and "--encoding" in msg
    assert load_corpus(str(path), tmp_path, encoding="latin-1").text == "Caf\u00e9 au lait\n"


def test_unknown_encoding_is_named(tmp_path, no_network):
    path = tmp_path / "t.txt"
    path.write_text("hi\n")
    with pytest.raises(UserError, match="'utf-42'"):
        load_corpus(str(path), tmp_path, encoding="utf-42")
    with pytest.raises(UserError, match="'utf-42'"):  # checked before any download
        load_corpus("https://example.invalid/t.txt", tmp_path, encoding="utf-42")


@pytest.mark.parametrize("content", [b"", b"  \n\r\n\t"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=f"^{path} is empty: "):
        load_corpus(str(path), tmp_path)


def test_missing_path(tmp_path, no_network):
    with pytest.raises(UserError) as err:
        load_corpus("shakespear", tmp_path)
    assert str(err.value) == (
        "dataset 'shakespear' not found: use one of shakespeare, simpsons, a path to a text file, or an http(s) URL"
    )


def test_directory(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        load_corpus(str(tmp_path), tmp_path)


def test_default_data_dir(monkeypatch):
    monkeypatch.delenv("MOE_TUI_DATA", raising=False)
    assert data.default_data_dir() == Path("data")
    monkeypatch.setenv("MOE_TUI_DATA", "")
    assert data.default_data_dir() == Path("data")
    monkeypatch.setenv("MOE_TUI_DATA", "/somewhere/else")
    assert data.default_data_dir() == Path("/somewhere/else")


# --------------------------------------------------------------------------------------------
# Vocab


def test_vocab_round_trip():
    text = "hello, world!\nÀ bientôt"
    vocab = Vocab.from_text(text)
    assert vocab.chars == sorted(set(text)) and len(vocab) == len(set(text))
    ids = vocab.encode(text)
    assert all(0 <= i < len(vocab) for i in ids)
    assert vocab.decode(ids) == text
    assert Vocab(["b", "a", "b"]).chars == ["a", "b"]


def test_vocab_unknown_chars_listed():
    vocab = Vocab.from_text("abc")
    assert vocab.unknown("abzxz!") == ["!", "x", "z"]
    with pytest.raises(UserError) as err:
        vocab.encode("abzxz!")
    assert "'!', 'x', 'z'" in str(err.value)


def test_vocab_decode_rejects_out_of_range():
    with pytest.raises(ValueError):
        Vocab.from_text("ab").decode([-1])


def test_vocab_json_round_trip():
    vocab = Vocab.from_text('Moe\'s "Tavern"\n\u00e9\u2019')
    again = Vocab.from_json(vocab.to_json())
    assert again == vocab and again.chars == vocab.chars
    assert list(json.loads(vocab.to_json())) == ["chars"]
    with pytest.raises(UserError):
        Vocab.from_json('{"nope": []}')


def test_interrupted_download_leaves_nothing(shared_dir, tmp_path, server, monkeypatch):
    base, root = server
    shutil.copy(shared_dir / "moes_tavern_lines.txt", root / "moe.txt")
    _point_corpus_at(monkeypatch, "simpsons", f"{base}/moe.txt")

    def interrupt(done: int, total: int | None) -> None:
        if done > 100_000:
            raise KeyboardInterrupt  # like Ctrl-C in the middle of the download

    with pytest.raises(KeyboardInterrupt):
        load_corpus("simpsons", tmp_path / "d", progress=interrupt)
    assert _files(tmp_path / "d") == []
