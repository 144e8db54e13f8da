"""The trainer's end of the control channel: viewers' commands in, live events out.

It is a subscriber of the trainer's event bus and a source of `Control` commands, nothing more: the
training loop does not know it exists. One thread serves every viewer with a selector; the training
thread only queues lines for it, so a slow, stuck or malicious viewer can never stall a step.
"""

from __future__ import annotations

import os
import queue
import selectors
import socket
import threading
from dataclasses import dataclass, field
from typing import Callable

from moe_core.data.vocab import Vocab
from moe_core.events import LIVE_ONLY, Event, Probed, StateChanged, to_record
from moe_core.hints import resume_command
from moe_core.live.lease import make_control_dir, socket_path
from moe_core.live.protocol import (
    MAX_LINE,
    PROTOCOL,
    VERSION,
    ProtocolError,
    encode,
    parse_command,
    peer_uid,
    socket_address,
)
from moe_core.store.runs import Run
from moe_core.train.control import Control

MAX_ASKERS = 256  # probes awaiting their answer, across viewers
MAX_BACKLOG = 4 << 20  # bytes queued for one viewer that does not read; past this it is dropped
ACTIONS = {"pause": Control.pause, "resume": Control.resume, "save": Control.save, "eval": Control.evaluate}


@dataclass(eq=False)
class _Viewer:
    sock: socket.socket
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytearray = field(default_factory=bytearray)
    skipping: bool = False  # inside an oversized line: drop bytes up to its newline


class ControlServer:
    name = "control channel"

    def __init__(self, run: Run, control: Control, vocab: Vocab, step: Callable[[], int]):
        self.run, self.control, self.vocab, self.step = run, control, vocab, step
        self.state = "starting"
        # (line, the request id of a probe's answer, for its asker alone; None: for every viewer)
        self._outgoing: queue.SimpleQueue[tuple[bytes, int | None]] = queue.SimpleQueue()
        self._askers: dict[int, _Viewer] = {}  # a probe's request id -> the viewer that sent it
        self._viewers: dict[socket.socket, _Viewer] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_out.setblocking(False)
        self._listener: socket.socket | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)

    def start(self) -> "ControlServer":
        make_control_dir(self.run)
        path = socket_path(self.run)
        path.unlink(missing_ok=True)  # left by a trainer that died: we hold the run's lock, so it is stale
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is born 0600, not chmod-ed after a window of exposure
        try:
            with socket_address(path) as address:
                listener.bind(address)
        finally:
            os.umask(old_umask)
        listener.listen(16)
        listener.setblocking(False)
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ)
        self._selector.register(self._wake_in, selectors.EVENT_READ)
        self._thread.start()
        return self

    def __call__(self, event: Event) -> None:
        """Bus subscriber (on the training thread): queue live events for every viewer."""
        if isinstance(event, StateChanged):
            self.state = event.state
        if isinstance(event, LIVE_ONLY):
            asker = event.request_id if isinstance(event, Probed) else None
            self._outgoing.put((encode({"type": "event", "event": to_record(event)}), asker))
            self._wake()

    def close(self) -> None:
        """Hang up on every viewer and remove the socket (they then see the process as gone)."""
        self._closing = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        socket_path(self.run).unlink(missing_ok=True)

    def _wake(self) -> None:
        try:
            self._wake_out.send(b"!")
        except OSError:  # its buffer is full of wake-ups already, or it is closed
            pass

    # -- the server thread ---------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while not self._closing:
                for key, mask in self._selector.select(timeout=1.0):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_in:
                        self._wake_in.recv(4096)
                        self._broadcast()
                    else:
                        try:
                            self._serve_viewer(key.data, mask)
                        except Exception:  # noqa: BLE001 - whatever one viewer causes, the others stay served
                            self._drop(key.data)
        finally:
            for viewer in list(self._viewers.values()):
                self._drop(viewer)
            self._selector.close()
            for sock in (self._listener, self._wake_in, self._wake_out):
                if sock is not None:
                    sock.close()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return
        uid = peer_uid(sock)
        if uid is not None and uid != os.geteuid():  # the folder's mode keeps others out; this is the belt
            sock.close()
            return
        sock.setblocking(False)
        viewer = _Viewer(sock)
        self._viewers[sock] = viewer
        self._selector.register(sock, selectors.EVENT_READ, viewer)
        self._send(
            viewer,
            {
                "type": "hello",
                "protocol": PROTOCOL,
                "version": VERSION,
                "run": self.run.name,
                "pid": os.getpid(),
                "state": self.state,
                "step": self.step(),
            },
        )

    def _serve_viewer(self, viewer: _Viewer, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(viewer)
        if mask & selectors.EVENT_READ and viewer.sock in self._viewers:
            try:
                data = viewer.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._drop(viewer)
                return
            viewer.inbox += data
            self._take_lines(viewer)

    def _take_lines(self, viewer: _Viewer) -> None:
        while viewer.sock in self._viewers:
            end = viewer.inbox.find(b"\n")
            if end < 0:
                if len(viewer.inbox) > MAX_LINE:  # no newline in sight: refuse now, skip to its end
                    viewer.inbox.clear()
                    if not viewer.skipping:
                        viewer.skipping = True
                        self._reply(viewer, None, f"line longer than {MAX_LINE} bytes")
                return
            line = bytes(viewer.inbox[:end])
            del viewer.inbox[: end + 1]
            if viewer.skipping:
                viewer.skipping = False
            elif len(line) > MAX_LINE:
                self._reply(viewer, None, f"line longer than {MAX_LINE} bytes")
            elif line.strip():
                self._act(viewer, line)

    def _act(self, viewer: _Viewer, line: bytes) -> None:
        try:
            verb, argument = parse_command(line, self.vocab)
        except ProtocolError as err:
            self._reply(viewer, None, str(err))
            return
        if verb == "stop":
            self.control.stop("stop requested by a viewer")
        elif verb == "sample":
            self.control.sample(argument)
        elif verb == "probe":
            self._askers[argument.request_id] = viewer
            if len(self._askers) > MAX_ASKERS:  # ids of probes refused (no answer comes): forget the oldest
                del self._askers[next(iter(self._askers))]
            self.control.probe(argument)
        elif verb == "set":
            if self.state == "error":  # the weights in memory are not trusted: resume instead
                self._reply(
                    viewer,
                    verb,
                    f"run '{self.run.name}' failed; its settings cannot change now; resume "
                    f"it with the new settings (`{resume_command(self.run.name, self.run.path.parent)} --lr ...`)",
                )
                return
            self.control.set(*argument)
        else:
            ACTIONS[verb](self.control)
        self._reply(viewer, verb, None)

    def _reply(self, viewer: _Viewer, verb: str | None, error: str | None) -> None:
        message = {"type": "reply", "cmd": verb, "ok": error is None}
        if error is not None:
            message["error"] = error
        self._send(viewer, message)

    def _broadcast(self) -> None:
        while True:
            try:
                line, asker = self._outgoing.get_nowait()
            except queue.Empty:
                return
            if asker is not None:  # a probe's answer: for its asker (if still here), not every viewer
                viewer = self._askers.pop(asker, None)
                if viewer is not None and viewer.sock in self._viewers:
                    self._send(viewer, line)
                continue
            for viewer in list(self._viewers.values()):
                self._send(viewer, line)

    def _send(self, viewer: _Viewer, message: dict | bytes) -> None:
        viewer.outbox += message if isinstance(message, bytes) else encode(message)
        if len(viewer.outbox) > MAX_BACKLOG:
            self._drop(viewer)
            return
        self._flush(viewer)

    def _flush(self, viewer: _Viewer) -> None:
        try:
            sent = viewer.sock.send(viewer.outbox) if viewer.outbox else 0
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(viewer)
            return
        del viewer.outbox[:sent]
        wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if viewer.outbox else 0)
        if self._selector.get_key(viewer.sock).events != wanted:
            self._selector.modify(viewer.sock, wanted, viewer)

    def _drop(self, viewer: _Viewer) -> None:
        self._askers = {asked: by for asked, by in self._askers.items() if by is not viewer}
        if self._viewers.pop(viewer.sock, None) is not None:
            self._selector.unregister(viewer.sock)
            viewer.sock.close()
