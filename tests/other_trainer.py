"""Stands in for a trainer this moe-tui cannot talk to: one of another user, or of another version.

    python -m tests.other_trainer RUN_DIR {other-user | other-protocol | live} SECONDS

It holds the run's lock and records itself in process.json (so the run reads as live), and listens on its control socket, greeting each
caller as a trainer would; `other-user` then gives the socket to user 65534 (nobody), as if another
user owned the run; `other-protocol` greets with a protocol version no moe-tui speaks. It prints
"ready" once set up, and exits after SECONDS or when its parent has gone.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

from moe_core.live.protocol import PROTOCOL, VERSION, socket_address


def main(run_dir: str, mode: str, seconds: float) -> None:
    control = os.path.join(run_dir, "control")
    os.makedirs(control, mode=0o700, exist_ok=True)
    lock = os.open(os.path.join(control, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    path = os.path.join(control, "socket")
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with socket_address(path) as address:
        listener.bind(address)
    listener.listen(4)
    if mode == "other-user":
        os.chown(path, 65534, 65534)
    protocol, version = (PROTOCOL + 98, "9.9.9") if mode == "other-protocol" else (PROTOCOL, VERSION)
    with open(os.path.join(run_dir, "process.json"), "w") as f:  # recorded as a trainer records itself
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "state": "live"}, f)
    print("ready", flush=True)
    parent, deadline = os.getppid(), time.monotonic() + seconds
    listener.settimeout(0.2)
    while time.monotonic() < deadline and os.getppid() == parent:
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            continue
        hello = {
            "type": "hello",
            "protocol": protocol,
            "run": os.path.basename(run_dir),
            "pid": os.getpid(),
            "state": "running",
            "step": 0,
            "version": version,
        }
        conn.sendall((json.dumps(hello) + "\n").encode())
        conn.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
