"""Data parallelism on torch.distributed: N processes (ranks), one model each, one global batch.

Every rank holds the whole model and draws the same global batch from the same random stream, then
trains on its own slice of the rows (`shard`). After the backward pass the ranks average their
gradients (`average_gradients`: one all-reduce), so that each takes the optimizer step one process
would have taken on the whole batch, and the weights stay identical everywhere. Rank 0 does all that
a run shows or keeps (files, events, the dashboard, the control channel); the others only train.

torchrun (or `moe-tui train --nproc N`, which starts torchrun's launcher) gives each process RANK,
WORLD_SIZE, LOCAL_RANK and the address of rank 0's store. gloo carries the collectives on CPU, NCCL
on CUDA (each rank on GPU LOCAL_RANK of its machine).

Every collective must be reached by every rank in the same order, or they wait on each other. These
are all of them, and where they happen:
- start: the device check (through the store), then rank 0's weights and state go to all (`Trainer.start`);
- each step: each MoE layer sums its expert counts (forward), then the gradients (after backward);
- each turn of the trainer's loop: the commands (`agree`), so that all act on the same one between the
  same two steps;
- each log line and evaluation: the statistics, summed (`sum`, `mean`); after an evaluation, whether it
  is the best so far (rank 0's word: it alone knows whether the last `best` reached the disk);
- with expert parallelism (moe_core/parallel/experts.py) also: in each MoE layer, forward and backward,
  the rows' exchange with the experts' ranks; each step, the gradient norm; each checkpoint or sample,
  every expert gathered;
- each step checkpoint: every rank's random streams, for rank 0 to save (`gather`);
- a stop: whether rank 0 has steps to save (`from_leader`);
- the end: the exit code (`same_exit_code`).
A rank that dies breaks the connection: the others' next collective fails (`LostRank`), and torchrun
stops them. A rank whose training fails (`RankFailed`) leaves at once, the same way: it may have failed
alone, between two collectives the others are already in. `COLLECTIVE_TIMEOUT` bounds a wait on a rank
that hangs instead.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn

import torch

from moe_core.errors import UserError
from moe_core.parallel.launch import launched_by_torchrun

# How long a collective waits for a rank that neither answers nor dies (stopped, stuck in I/O).
# Longer than anything one rank does alone between two collectives: rank 0 saving a checkpoint or
# writing a sample while the others wait for the next command.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


class LostRank(Exception):
    """A collective failed: another rank died or stopped answering. Not a RuntimeError, so that the
    trainer's loop does not take it for a failure of training it could report and serve on from."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out  # the other rank did not answer (rather than: its connection closed)


class PeerFailed(UserError):
    """Another rank could not start, and said why (`report_setup_failure`): this one stops too, saying so
    where it is the first process of its machine, but does not report it again as its own."""


class RankFailed(Exception):
    """Training failed on this rank (out of memory, say), maybe on this rank alone and in the middle of
    a collective the others wait in: no further collective can be trusted, so the rank leaves at once
    and the others learn of it from the broken connection (`LostRank`), instead of waiting out
    `COLLECTIVE_TIMEOUT`."""


@dataclass(frozen=True)
class Ranks:
    """Which process this is, of how many. One process: rank 0 of 1, and every method is a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0  # on this machine: which GPU it uses
    # A stop this follower holds back for one turn of the loop (see `agree`).
    _held: list = field(default_factory=list, compare=False, repr=False)

    @property
    def leader(self) -> bool:
        """Rank 0: the one that writes the run folder and talks to the user."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    # -- the global batch ----------------------------------------------------------------------

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch's rows: rank r takes rows [r*b, (r+1)*b)."""
        if not self.parallel:
            return rows
        per_rank = rows.shape[0] // self.world
        return rows[self.rank * per_rank : (self.rank + 1) * per_rank]

    # -- collectives ---------------------------------------------------------------------------

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (and returned)."""
        if self.parallel:
            collective(torch.distributed.all_reduce, tensor)
        return tensor

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean over ranks, in place (gloo has no AVG: a sum, then a division)."""
        return self.sum(tensor).div_(self.world) if self.parallel else tensor

    def average_gradients(self, model: torch.nn.Module, local: set[int] = frozenset()) -> None:
        """Every rank's gradients replaced by their mean over ranks: one all-reduce of one flat buffer.

        Each rank's loss is a mean over its slice, the slices are equal, so the mean of the slice
        gradients is the gradient of the global batch's mean loss: what one process computes.
        `local`: ids of parameters this rank alone holds (its experts, with expert parallelism), whose
        gradient already sums every rank's part: divided by the number of ranks, not all-reduced.
        """
        if not self.parallel:
            return
        for p in model.parameters():
            if id(p) in local and p.grad is not None:
                p.grad.div_(self.world)
        params = [p for p in model.parameters() if p.requires_grad and id(p) not in local]
        # A parameter no token reached has no gradient here but may have one on another rank: zeros.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.mean(torch.cat([g.reshape(-1) for g in grads]))
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p)

    def agree(self, command: tuple[str, Any] | None) -> tuple[str, Any] | None:
        """The command every rank acts on now: a stop from any rank (a signal sent to that process),
        else rank 0's (its front end: the dashboard, a viewer, the control channel)."""
        if not self.parallel:
            return command
        # A stop signalled to a follower is offered one turn late. A signal to the whole job (Ctrl-C or
        # SIGTERM, which the launcher passes on to every rank; `pkill`) reaches every rank at about the
        # same time, but each acts on it when it next runs Python code: waiting a turn lets rank 0's
        # stop, which names no rank, be the one that is reported.
        if self._held:
            command = self._held.pop()
        elif command is not None and command[0] == "stop" and not self.leader:
            self._held.append(command)
            command = None
        commands: list[tuple[str, Any] | None] = [None] * self.world
        collective(torch.distributed.all_gather_object, commands, command)
        stops = [c for c in commands if c is not None and c[0] == "stop"]
        return stops[0] if stops else commands[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's value of a small picklable object, in rank order, on every rank."""
        if not self.parallel:
            return [value]
        values: list[Any] = [None] * self.world
        collective(torch.distributed.all_gather_object, values, value)
        return values

    def from_leader(self, value: Any) -> Any:
        """Rank 0's value of a small picklable object, on every rank."""
        if not self.parallel:
            return value
        box = [value]
        collective(torch.distributed.broadcast_object_list, box, 0)
        return box[0]

    def same_exit_code(self, code: int) -> int:
        """The largest exit code of all ranks, so that all exit with the same one (a signal's 128 + n
        on one rank wins over 0 on the others)."""
        if not self.parallel:
            return code
        box = torch.tensor([code])
        collective(torch.distributed.all_reduce, box, op=torch.distributed.ReduceOp.MAX)
        return int(box.item())


def rng_state(device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This process's random streams that dropout and router noise draw from: torch's, and the GPU's."""
    return torch.get_rng_state(), torch.cuda.get_rng_state() if device.startswith("cuda") else None


def set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: str) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None and device.startswith("cuda"):
        torch.cuda.set_rng_state(cuda)


def on_cpu(value: Any) -> Any:
    """`value` with its tensors copied to the CPU: pickled CUDA tensors would unpickle on rank 0's GPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    return value


def collective(function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except RuntimeError as err:  # gloo and NCCL raise DistBackendError, a RuntimeError, on a lost peer
        raise LostRank(
            f"lost contact with another process of this run ({_first_line(err)}); "
            "torchrun's report names it; resume from the last checkpoint",
            timed_out="timed out" in str(err).lower() or "timeout" in str(err).lower(),
        ) from None


def _first_line(err: Exception) -> str:
    """ "[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:53407. This is ..."
    -> "Connection closed by peer [127.0.0.1]:53407"."""
    reason = re.sub(r"^\[[^\]]*\]\s*", "", (str(err).strip().splitlines() or [type(err).__name__])[0])
    return reason.split(". ")[0][:160]


# -- joining and leaving ------------------------------------------------------------------------

SINGLE = Ranks()


def from_environment() -> Ranks:
    """This process's place, from the variables torchrun sets; one process of one without them."""
    if not launched_by_torchrun():
        return SINGLE
    return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def check_batch(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise UserError(
            f"--batch-size {batch_size} is global and must split evenly over {world} processes; "
            f"use a multiple of {world} (e.g. --batch-size {max(world, batch_size // world * world)})"
        )


def check_cuda_count(nproc: int, available: int) -> None:
    if nproc > available:
        raise UserError(
            f"--nproc {nproc} asks for more processes than the {available} CUDA GPU(s) here, and "
            f"each process needs a GPU of its own; use --nproc {max(available, 1)} or fewer, or "
            "--device cpu"
        )


def check_backend(device: str, world: int) -> None:
    """A device that torch.distributed can join `world` processes on."""
    if device == "mps" and world > 1:
        raise UserError(
            "torch.distributed has no backend for Apple MPS; train several processes with "
            "--device cpu, or one process on mps"
        )


def check_same_devices(kinds: list[str]) -> None:
    """One kind of device on every rank: gloo and NCCL do not talk to each other."""
    if len(set(kinds)) > 1:
        where = ", ".join(f"rank {r} {kind}" for r, kind in enumerate(kinds))
        raise UserError(
            f"the processes of this run are on different devices ({where}); give every process "
            "the same --device (e.g. --device cuda on every machine, or --device cpu)"
        )


def start(ranks: Ranks, device: str, batch_size: int) -> str:
    """Join the other ranks: check that the run can split, then open the process group. Returns the
    device this rank trains on (`cuda:LOCAL_RANK` on CUDA). Raises UserError on every rank alike."""
    if not ranks.parallel:
        return device
    import torch.distributed as dist

    check_batch(batch_size, ranks.world)
    check_backend(device, ranks.world)
    if device == "cuda":  # before joining, so that a failure here reaches the others (`_joined`)
        check_cuda_count(ranks.local_rank + 1, torch.cuda.device_count())
    # Compare devices through the launcher's key-value store, before a backend is chosen for them.
    try:
        store = _store(ranks, COLLECTIVE_TIMEOUT)
        store.set(f"device/{ranks.rank}", device)
        devices = _joined(store, ranks.world, "device")
    except RuntimeError as err:  # the store went with the machine that hosted it (its process failed)
        raise LostRank(
            f"lost contact with the other machines' processes ({_first_line(err)}); their output says why"
        ) from None
    check_same_devices(devices)
    if device == "cuda":
        torch.cuda.set_device(ranks.local_rank)
        device = f"cuda:{ranks.local_rank}"
    # On CUDA, NCCL for the GPU tensors and gloo for the few CPU ones (route counts, the exit code).
    dist.init_process_group(
        "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo",
        store=store,
        rank=ranks.rank,
        world_size=ranks.world,
        timeout=COLLECTIVE_TIMEOUT,
    )
    return device


def _store(ranks: Ranks, timeout: timedelta):
    """The launcher's key-value store, which every rank reaches before any process group exists."""
    import torch.distributed as dist

    store, _, _ = next(dist.rendezvous("env://", ranks.rank, ranks.world, timeout=timeout))
    # Per attempt: torchrun --max-restarts keeps its store, and an earlier attempt's keys must not count.
    return dist.PrefixStore(f"moe-tui/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


FAILED = "failed"  # "RANK\nwhy": the first rank that could not start (`report_setup_failure`)


def _joined(store, world: int, key: str) -> list[str]:
    """Every rank's value of `key`, once all have set it. A rank that could not start sets `FAILED`
    instead: then every rank stops, naming it, instead of waiting `COLLECTIVE_TIMEOUT` for it."""
    deadline = time.monotonic() + COLLECTIVE_TIMEOUT.total_seconds()
    while not store.check([f"{key}/{r}" for r in range(world)]):
        if store.check([FAILED]):
            rank, _, why = store.get(FAILED).decode().partition("\n")
            raise PeerFailed(f"process {rank} of {world} could not start: {why}")
        if time.monotonic() > deadline:
            missing = [r for r in range(world) if not store.check([f"{key}/{r}"])]
            raise LostRank(
                f"process(es) {', '.join(map(str, missing))} of {world} did not start within "
                f"{COLLECTIVE_TIMEOUT}; check their machines' output",
                timed_out=True,
            )
        time.sleep(0.05)
    return [store.get(f"{key}/{r}").decode() for r in range(world)]


def report_setup_failure(message: str) -> None:
    """Tell the other ranks, waiting in `start`, that this one cannot start and why (best effort)."""
    ranks = from_environment()
    if not ranks.parallel:
        return
    try:  # the first to fail is the one named: later ones may only be failing on its account
        _store(ranks, timedelta(seconds=10)).compare_set(FAILED, "", f"{ranks.rank}\n{message}")
    except Exception:  # no store to reach: torchrun still sees this rank fail, and stops the others
        pass


def leave(code: int) -> NoReturn:
    """End this rank's process now, with `code`, once its output is flushed.

    Not through the interpreter's normal teardown: there the process group's C++ threads are destroyed
    while other ranks exit too, and under load that sometimes aborts the process ("terminate called
    without an active exception", SIGABRT), turning a clean exit into a crash. Everything worth doing
    at exit (the final checkpoint, the lease) is done by then."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a terminal that is gone
            pass
    os._exit(code)
