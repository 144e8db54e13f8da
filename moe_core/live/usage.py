"""What the training process costs the machine: CPU, resident memory and, on CUDA, the GPU.

Sampled by the process itself, on a thread of its own, once a second, and published as a
`ResourceUsage` event: every viewer then shows the trainer's figures, not its own. The same event is
the heartbeat that tells a viewer the trainer is still there.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from typing import Callable

from moe_core.events import EventSink, ResourceUsage

INTERVAL_SECONDS = 1.0


def resident_bytes() -> int:
    """Resident memory now (/proc on Linux), else the peak the kernel reports."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def gpu_figures(device: str) -> tuple[float | None, int | None]:
    """(utilisation %, bytes held by torch's allocator) on CUDA; utilisation needs NVML (pynvml)."""
    if device != "cuda":
        return None, None
    import torch

    try:
        utilisation: float | None = float(torch.cuda.utilization())
    except Exception:  # noqa: BLE001 - no NVML, or it cannot see this GPU: the figure is simply unknown
        utilisation = None
    return utilisation, int(torch.cuda.memory_reserved())


class UsageMonitor:
    """Publishes a ResourceUsage every `interval` seconds until `stop()`."""

    def __init__(self, publish: EventSink, step: Callable[[], int], device: str, interval: float = INTERVAL_SECONDS):
        self.publish, self.step, self.device, self.interval = publish, step, device, interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="usage", daemon=True)

    def start(self) -> "UsageMonitor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        cpu_before, wall_before = _cpu_seconds(), time.monotonic()
        while not self._stopped.wait(self.interval):
            cpu, wall = _cpu_seconds(), time.monotonic()
            percent = 100.0 * (cpu - cpu_before) / max(wall - wall_before, 1e-6)
            cpu_before, wall_before = cpu, wall
            gpu_percent, gpu_bytes = gpu_figures(self.device)
            self.publish(ResourceUsage(self.step(), round(percent, 1), resident_bytes(), gpu_percent, gpu_bytes))


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system  # every thread of this process
