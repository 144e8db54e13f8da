"""`moe-tui train ... --nproc N`: the same as `torchrun --standalone --nproc-per-node N -m tui train ...`,
started through torchrun's own launcher (torch.distributed.run) in this process, so that the command
can exit the way one process does: with the code the ranks agreed on (0, 1, or 128 + a signal's
number), or, when a rank was killed outright, with one line naming it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from moe_core.signals import signal_exit_code

LAUNCHED = "MOE_TUI_NPROC"  # set for the ranks that `--nproc` starts


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(nproc: int, args: list[str], resume_hint: str) -> int:
    """Run `python -m tui ARGS` as `nproc` ranks on this machine; returns the exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    # A fair share of the cores each: N processes of all-core torch threads would fight for them.
    os.environ[LAUNCHED] = "1"  # the ranks leave naming a lost rank to this process, which knows which it was
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # The launcher's own log lines (each rank's exit, signals passed on) would bury the run's; what
    # matters is said below, in one line. Each of its loggers sets its own level: quiet them one by one.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # torchrun --standalone: a rendezvous on a free port of this machine (what `run()` sets for the flag).
    config, command, command_args = config_from_args(
        parse_args(
            [
                "--rdzv-backend=c10d",
                "--rdzv-endpoint=localhost:0",
                f"--rdzv-id=moe-tui-{os.getpid()}",
                f"--nproc-per-node={nproc}",
                "-m",
                "tui",
                *args,
            ]
        )
    )
    try:
        elastic_launch(config, command)(*command_args)
        return 0
    except ChildFailedError as err:
        # A rank killed by a signal is the cause; the others then failed on losing it, or were stopped
        # by the launcher (SIGTERM) while waiting in a collective for it.
        failures = sorted(err.failures.items())
        killed = [(rank, f) for rank, f in failures if f.exitcode < 0 and -f.exitcode != signal.SIGTERM]
        if not killed:
            said = [f.exitcode for _, f in failures if f.exitcode > 0]
            if said:  # the ranks ended on their own (the one that failed first saying why)
                return max(said)
            killed = [(rank, f) for rank, f in failures if f.exitcode < 0]
        rank, failure = killed[0]
        name = signal.Signals(-failure.exitcode).name
        print(
            f"error: process {rank} of {nproc} (pid {failure.pid}) was killed by {name}, and the others were "
            f"stopped; resume from the last checkpoint with: {resume_hint}",
            file=sys.stderr,
        )
        return 1
    except SignalException as err:  # sent to this launcher: the ranks got it too, saved and exited
        return signal_exit_code(err.sigval)
