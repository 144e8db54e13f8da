"""A terminal notification for an alert: the bell, and the desktop-notification escapes OSC 9 (iTerm2,
Windows Terminal, kitty, foot, WezTerm) and OSC 777 (VTE terminals, rxvt). They travel over SSH as
any output does; inside tmux they are wrapped to pass through it (tmux's `allow-passthrough on`)."""

from __future__ import annotations

import os


def notification(title: str, body: str) -> str:
    body = " ".join(body.replace("\x1b", "").replace("\x07", "").split())[:200]
    escapes = [f"\x1b]9;{title}: {body}\x07", f"\x1b]777;notify;{title};{body}\x07"]
    if os.environ.get("TMUX"):
        escapes = [f"\x1bPtmux;{e.replace(chr(27), chr(27) * 2)}\x1b\\" for e in escapes]
    return "\a" + "".join(escapes)
