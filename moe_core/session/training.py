"""A training session: one `moe-tui train` from start to exit code, usable from Python without Typer.

    session = TrainingSession(TrainRequest(dataset="simpsons", settings={"max_iters": 200}))
    session.prepare()
    code = session.train(front_end)      # front_end(Running) -> exit code, e.g. a plain reporter

With `nproc` the session starts the ranks instead (`launch`), each of which runs the same command. In
a rank, or a single process, `train` joins the others, then leads (rank 0: the run folder, its lease,
the live channel, the trackers and the front end) or follows (trains in step, writing nothing), and
returns the exit code every rank agrees on.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable

from moe_core.bus import EventBus
from moe_core.errors import UserError
from moe_core.hints import resume_command, sample_command
from moe_core.live.host import LiveTraining
from moe_core.live.lease import RunLease, already_live_message, is_live, read_status
from moe_core.parallel import ranks as parallel
from moe_core.parallel.experts import check_expert_parallel
from moe_core.parallel.launch import LAUNCHED, launch
from moe_core.parallel.ranks import LostRank, RankFailed, Ranks
from moe_core.session.prepare import Plan, Progress, TrainRequest, prepare
from moe_core.signals import HANGUP, outcome_exit_code, signal_reason, stop_signals_handled
from moe_core.store.runs import Run
from moe_core.track import Tracking
from moe_core.train.guard import Guard
from moe_core.train.trainer import Trainer


@dataclass
class Running:
    """What a front end gets on rank 0: the trainer inside its live channel and trackers."""

    trainer: Trainer
    live: LiveTraining
    tracking: Tracking
    resume_hint: str  # the command that resumes this run, on as many processes
    sample_hint: str

    @property
    def bus(self) -> EventBus:
        return self.live.bus

    def finalise(self) -> None:
        """End the trackers and free the run: before a forced exit (after a hangup)."""
        self.tracking.close()
        self.live.close()


FrontEnd = Callable[[Running], int]


class TrainingSession:
    def __init__(self, request: TrainRequest, ranks: Ranks | None = None):
        if request.nproc is not None and request.nproc < 1:
            raise UserError(f"--nproc must be a positive integer, got {request.nproc}")
        self.request = request
        self.ranks = ranks or parallel.from_environment()
        self.plan: Plan | None = None

    @property
    def launching(self) -> bool:
        """This process starts the ranks (`--nproc`), rather than being one."""
        return self.request.nproc is not None and not parallel.launched_by_torchrun()

    @property
    def world(self) -> int:
        return self.request.nproc if self.launching else self.ranks.world

    def prepare(self, progress: Progress | None = None) -> Plan:
        """Check and read what to train; nothing is written yet (see `moe_core.session.prepare`)."""
        self.plan = prepare(self.request, self.ranks.leader, progress)
        if self.request.expert_parallel:
            check_expert_parallel(self.plan.config, self.world)
        return self.plan

    def resume_hint(self, name: str) -> str:
        return resume_command(name, self.request.runs_dir, self.world, self.request.expert_parallel)

    # -- starting the ranks ----------------------------------------------------------------------

    def launch(self, args: list[str]) -> int:
        """Start `nproc` ranks that each run `moe-tui ARGS` (this command, less --nproc); their exit code."""
        plan, nproc = self.plan, self.request.nproc
        parallel.check_batch(plan.config.batch_size, nproc)
        if plan.device == "cuda":
            import torch

            parallel.check_cuda_count(nproc, torch.cuda.device_count())
        parallel.check_backend(plan.device, nproc)
        args = without_nproc(args) + (
            [] if self.request.resume or self.request.run_name else ["--run-name", plan.run.name]
        )
        return launch(nproc, args, self.resume_hint(plan.run.name))

    # -- training ------------------------------------------------------------------------------

    def train(
        self, front_end: FrontEnd, on_live: Callable[[Run], None] = lambda run: None, on_alert: str = "warn"
    ) -> int:
        """Join the other ranks, lead or follow, and return the exit code; with several ranks this process
        ends here. `on_live(run)` runs once the trainer is built, before training starts (on rank 0, once
        the run is leased). `on_alert`: what a guard alert does unless the run's settings say (the front
        end's default)."""
        ranks = self.ranks
        try:
            self.device = parallel.start(ranks, self.plan.device, self.plan.config.batch_size)
            leading = not (ranks.parallel and not ranks.leader)
            code = self._lead(front_end, on_live, on_alert) if leading else self._follow(on_live)
            code = ranks.same_exit_code(code)
        except (LostRank, RankFailed) as err:
            # A rank that died is named by `--nproc`'s launcher, which knows which it was; one that hangs is not.
            if not (isinstance(err, LostRank) and not err.timed_out and os.environ.get(LAUNCHED)):
                print(f"error: {err}", file=sys.stderr)
            code = 1
        if ranks.parallel:
            parallel.leave(code)
        return code

    def _new_trainer(self, run: Run) -> Trainer:
        plan = self.plan
        return Trainer.start(
            plan.config,
            run,
            plan.vocab,
            plan.token_ids(),
            resume=plan.resuming,
            ranks=self.ranks,
            device=self.device,
            expert_parallel=self.request.expert_parallel,
        )

    def _lead(self, front_end: FrontEnd, on_live: Callable[[Run], None], on_alert: str) -> int:
        """One process, or rank 0 of several: the run folder, its lease, the front end."""
        plan, run = self.plan, self.plan.run
        if plan.fork is not None:  # a new run that starts as a resumed one, from its parent's checkpoint
            run.initialise(plan.config, plan.vocab)
            plan.fork.start(run)
        try:
            lease = RunLease.acquire(run) if plan.resuming else None  # before the trainer rewinds the run's files
        except UserError:
            self.ranks.from_leader(None)  # the others leave quietly: this rank says why
            raise
        self.ranks.from_leader(run.name)
        try:
            trainer = self._new_trainer(run)
            if plan.fork is not None:
                trainer.forget_best()  # its own best from here: the parent's lies in the parent's folder
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        if plan.resuming:
            if plan.changed:
                run.save_config(plan.config)
        else:
            if self.request.overwrite and run.path.is_dir() and is_live(run):  # last: the trainer took a while
                raise UserError(already_live_message(run, read_status(run).pid))
            run.initialise(plan.config, trainer.vocab, replace=self.request.overwrite)
            lease = RunLease.acquire(run)
        lease.activate()
        on_live(run)
        with LiveTraining(trainer, lease, EventBus()) as live, Tracking(plan.config, run, live.bus) as tracking:
            if plan.config.guard:  # a subscriber like the others: it reads the events, asks the loop to act
                live.bus.subscribe(Guard(plan.config, trainer.control, plan.config.on_alert or on_alert))
            return front_end(
                Running(
                    trainer, live, tracking, self.resume_hint(run.name), sample_command(run.name, self.request.runs_dir)
                )
            )

    def _follow(self, on_live: Callable[[Run], None]) -> int:
        """Ranks 1..N-1: train in step with rank 0, writing and printing nothing. A stop signal sent to
        this process stops all ranks (see Ranks.agree); SIGHUP is rank 0's to act on."""
        name = self.ranks.from_leader(None)
        if name is None:  # rank 0 refused the run and says why: leave quietly
            parallel.leave(2)
        try:
            trainer = self._new_trainer(Run(self.request.runs_dir / name))
        except LostRank:  # rank 0 failed to set up (a corrupt checkpoint, say) and says why itself
            parallel.leave(1)
        on_live(trainer.run_folder)
        received: list[int] = []

        def on_signal(signum, frame):
            if signum != HANGUP:
                received.append(signum)
                trainer.control.stop(f"{signal_reason(signum)} by rank {self.ranks.rank}")

        with stop_signals_handled(on_signal):
            outcome = trainer.run()
        return outcome_exit_code(outcome, False, received[0] if received else None, trainer.guard_stopped)


def without_nproc(args: list[str]) -> list[str]:
    """A command's arguments less `--nproc N`: what each rank runs."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
