"""The control channel's wire format: one JSON object per line, both ways, versioned.

    server -> client   {"type": "hello", "protocol": 1, "version": "0.1.0", "run": NAME, "pid": 123,
                        "state": "running", "step": 40}
                       {"type": "event", "event": {...}}          a live event (see events.LIVE_ONLY)
                       {"type": "reply", "cmd": "pause", "ok": true}   or "ok": false, "error": "..."
    client -> server   {"v": 1, "cmd": "pause" | "resume" | "save" | "eval" | "stop" | "sample" | "set", ...}
                       sample takes prompt, max_new_tokens, temperature, top_k, top_p, seed;
                       set takes changes ({"lr": 0.001, ...}) and source (who asks, for the log)
                       probe takes text, masked ([[layer, expert], ...]), top_k, capacity_factor,
                       compare, experts, prompt, sample_tokens, seed, request_id; the answer is a
                       Probed event, sent to the viewer that asked

The server never executes anything it is sent: a line is parsed into one of the verbs above, or
answered with an error.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from moe_core.data.vocab import Vocab
from moe_core.errors import UserError
from moe_core.model.request import SampleRequest
from moe_core.probe.request import Intervention, ProbeRequest

PROTOCOL = 1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moe-tui")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


VERSION = _version()  # told in the greeting, so that a viewer of another version can say which to use
MAX_LINE = 64 * 1024  # bytes; a longer line is refused (and skipped to its end)
MAX_SAMPLE_CHARS = 10_000  # the most characters one request may ask for: sampling pauses training
MAX_PROBE_CHARS = 4_000  # a probed text's answer holds ~30 bytes per character and layer, under MAX_BACKLOG
SUN_PATH_MAX = 107  # bytes in an AF_UNIX address on Linux (108 with the terminating NUL)
VERBS = ("pause", "resume", "save", "eval", "stop", "sample", "set", "probe")
SAMPLE_FIELDS = {
    "prompt": str,
    "max_new_tokens": int,
    "temperature": (int, float),
    "top_k": (int, type(None)),
    "top_p": (int, float, type(None)),
    "seed": (int, type(None)),
}


class ProtocolError(ValueError):
    """A line the server will not act on; the text goes back to the sender."""


def encode(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":")) + "\n").encode()


def parse_command(line: bytes, vocab: Vocab) -> tuple[str, Any]:
    """(verb, argument) from one client line; ProtocolError for anything else."""
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolError("not a JSON object") from None
    if not isinstance(message, dict):
        raise ProtocolError("not a JSON object")
    if message.get("v") != PROTOCOL:
        raise ProtocolError(f"protocol version {message.get('v')!r} is not {PROTOCOL}")
    verb = message.get("cmd")
    if verb not in VERBS:
        raise ProtocolError(f"unknown command {verb!r}; known: {', '.join(VERBS)}")
    if verb == "set":
        return verb, _settings_arguments(message)
    if verb == "probe":
        return verb, _probe_arguments(message, vocab)
    if verb != "sample":
        return verb, None
    fields = {k: v for k, v in message.items() if k in SAMPLE_FIELDS}
    for key, value in fields.items():
        if not isinstance(value, SAMPLE_FIELDS[key]) or isinstance(value, bool):
            raise ProtocolError(f"sample: {key} has the wrong type")
    request = SampleRequest(**fields)
    if request.max_new_tokens > MAX_SAMPLE_CHARS:
        raise ProtocolError(f"sample: at most {MAX_SAMPLE_CHARS} characters at a time")
    try:
        request.check()
        vocab.encode(request.prompt)
    except UserError as err:
        raise ProtocolError(f"sample: {err}") from None
    return verb, request


def _settings_arguments(message: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A set command's (changes, source): names and numbers only; the trainer checks their values."""
    changes, source = message.get("changes"), message.get("source", "viewer")
    if not isinstance(changes, dict) or not changes or len(changes) > 32:
        raise ProtocolError("set: changes must be an object of one or more settings")
    for key, value in changes.items():
        if not isinstance(key, str) or not isinstance(value, (int, float, str)) or isinstance(value, bool):
            raise ProtocolError(f"set: {key!r} has the wrong type")
    if not isinstance(source, str) or len(source) > 64:
        raise ProtocolError("set: source must be a short string")
    return changes, source


PROBE_FIELDS = {
    "text": str,
    "top_k": (int, type(None)),
    "capacity_factor": (int, float, type(None)),
    "compare": bool,
    "experts": bool,
    "prompt": str,
    "sample_tokens": int,
    "seed": int,
    "request_id": int,
}


def _probe_arguments(message: dict[str, Any], vocab: Vocab) -> ProbeRequest:
    """A probe command's request: plain values of the right types; the trainer checks them against the model."""
    fields = {k: v for k, v in message.items() if k in PROBE_FIELDS}
    for key, value in fields.items():
        wrong_bool = isinstance(value, bool) and PROBE_FIELDS[key] is not bool
        if not isinstance(value, PROBE_FIELDS[key]) or wrong_bool:
            raise ProtocolError(f"probe: {key} has the wrong type")
    masked = message.get("masked", [])
    if not isinstance(masked, list) or len(masked) > 1024 or not all(_is_pair(m) for m in masked):
        raise ProtocolError("probe: masked must be a list of [layer, expert] pairs")
    if len(fields.get("text", "")) > MAX_PROBE_CHARS or fields.get("sample_tokens", 0) > MAX_SAMPLE_CHARS:
        raise ProtocolError(f"probe: at most {MAX_PROBE_CHARS} characters of text at a time")
    try:
        vocab.encode(fields.get("text", "") + fields.get("prompt", ""))
    except UserError as err:
        raise ProtocolError(f"probe: {err}") from None
    top_k, factor = fields.pop("top_k", None), fields.pop("capacity_factor", None)
    change = Intervention(tuple((layer, e) for layer, e in masked), top_k, factor)
    return ProbeRequest(intervention=change, **fields)


def _is_pair(item: Any) -> bool:
    return isinstance(item, list) and len(item) == 2 and all(type(v) is int for v in item)


def probe_arguments(request: ProbeRequest) -> dict[str, Any]:
    """The fields of a probe command."""
    change = request.intervention
    fields = {name: getattr(request, name) for name in PROBE_FIELDS if hasattr(request, name)}
    return {
        **fields,
        "masked": [list(m) for m in change.masked],
        "top_k": change.top_k,
        "capacity_factor": change.capacity_factor,
    }


def sample_arguments(request: SampleRequest) -> dict[str, Any]:
    """The fields of a sample command (one stream: the trainer samples one text at a time)."""
    return {name: getattr(request, name) for name in SAMPLE_FIELDS}


@contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """An AF_UNIX address for `path`, also past the 107 bytes Linux allows in one: then the socket's
    folder is opened and named through /proc/self/fd, which the kernel resolves like the folder."""
    path = Path(os.path.abspath(path))
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield str(path)
        return
    if not os.path.isdir("/proc/self/fd"):
        raise UserError(f"the control socket path {path} is longer than {SUN_PATH_MAX} bytes; use a shorter --runs-dir")
    fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def peer_uid(sock: socket.socket) -> int | None:
    """The user id of the process at the other end of a Unix socket, where the platform says (Linux)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]  # (pid, uid, gid)
