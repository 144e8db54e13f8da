"""A viewer's end of the control channel: connect to a live trainer, send commands, read live events.

client = ControlClient.connect(run)          # None when no trainer is live
client.send("pause")
for message in client.receive(): ...         # never blocks; raises TrainerGone at end of stream
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from moe_core.errors import UserError
from moe_core.live.lease import is_live, socket_path
from moe_core.live.protocol import MAX_LINE, PROTOCOL, VERSION, encode, peer_uid, socket_address
from moe_core.store.runs import Run

HELLO_SECONDS = 5.0  # a live trainer answers at once; it may be busy compiling, so allow some time


class TrainerGone(Exception):
    """The connection ended: the training process exited or died."""


class ControlClient:
    def __init__(self, sock: socket.socket, hello: dict[str, Any], rest: bytes):
        self.sock, self.hello, self._inbox = sock, hello, bytearray(rest)

    @classmethod
    def connect(cls, run: Run, timeout: float = HELLO_SECONDS) -> "ControlClient | None":
        """Connected and greeted, or None where no trainer is live. UserError for a socket that is
        not this user's, or a trainer that speaks another protocol version."""
        path = socket_path(run)
        try:
            owner = os.stat(path).st_uid
        except PermissionError:
            raise UserError(
                f"{path.parent} belongs to another user; only its owner can watch or control run '{run.name}'"
            ) from None
        except FileNotFoundError:
            return None
        if owner != os.geteuid():
            raise UserError(
                f"the control socket {path} belongs to user id {owner}, not you; only its "
                f"owner can control run '{run.name}'"
            )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            with socket_address(path) as address:
                sock.connect(address)
            hello, rest = _read_hello(sock)
        except (OSError, TrainerGone):  # refused, reset, timed out, a full queue (a stopped trainer): try later
            sock.close()  # a stale socket of a trainer that died, one exiting right now, or a stopped one
            return None
        uid = peer_uid(sock)
        if uid is not None and uid != os.geteuid():
            sock.close()
            raise UserError(f"the process behind {path} runs as user id {uid}, not you; it is not moe-tui's")
        if hello.get("type") != "hello" or hello.get("protocol") != PROTOCOL:
            sock.close()
            theirs = hello.get("version", "of another version")
            raise UserError(
                f"run '{run.name}' is trained by moe-tui {theirs}, which speaks control protocol "
                f"{hello.get('protocol')!r}; this moe-tui ({VERSION}) speaks {PROTOCOL}: use the same "
                f"version as the trainer (`pip install moe-tui=={theirs}`)"
            )
        sock.setblocking(False)
        return cls(sock, hello, rest)

    def send(self, verb: str, **arguments: Any) -> None:
        self.send_raw(encode({"v": PROTOCOL, "cmd": verb, **arguments}))

    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(5.0)
            self.sock.sendall(data)
        except OSError as err:
            raise TrainerGone(str(err)) from None
        finally:
            self.sock.setblocking(False)

    def receive(self) -> list[dict[str, Any]]:
        """Every whole message that has arrived; TrainerGone once the stream has ended."""
        ended = False
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                ended = True
                break
            self._inbox += data
        messages = []
        while (end := self._inbox.find(b"\n")) >= 0:
            line = bytes(self._inbox[:end])
            del self._inbox[: end + 1]
            try:
                messages.append(json.loads(line))
            except ValueError:
                continue
        if ended and not messages:
            raise TrainerGone("the training process closed the connection")
        return messages

    def wait_for(self, predicate, timeout: float) -> dict[str, Any] | None:
        """The first message for which `predicate` holds, within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.receive():
                if predicate(message):
                    return message
            time.sleep(0.02)
        return None

    def close(self) -> None:
        self.sock.close()


def _read_hello(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise TrainerGone("closed before greeting")
        data += chunk
        if len(data) > MAX_LINE:
            raise TrainerGone("no greeting line")
    line, rest = data.split(b"\n", 1)
    try:
        return json.loads(line), rest
    except ValueError:
        return {}, rest


def live_client(run: Run, timeout: float = HELLO_SECONDS) -> ControlClient | None:
    """A connection to the run's trainer if one is live (the lock says so), else None."""
    return ControlClient.connect(run, timeout) if is_live(run) else None
