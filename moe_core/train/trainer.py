"""The training loop, driven by any front end through events out and a small control interface in.

    trainer = Trainer.start(config, run, vocab, ids, on_event=print, resume=False)
    trainer.control.pause()        # safe from any thread
    trainer.run()                  # returns State.FINISHED, STOPPED or ERROR

All that a checkpoint holds goes through `state_dict()` and `load_state_dict()` (the pattern of
torch.distributed.checkpoint's Stateful): writing one, resuming, and rank 0 handing its state to the
other ranks at start.

With several processes (moe_core/parallel/ranks.py) every rank runs this same loop, in step: the
commands are agreed between steps, the statistics summed; rank 0 alone emits events, writes the run
folder and samples.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from moe_core.config import Config
from moe_core.data.vocab import Vocab
from moe_core.errors import UserError
from moe_core.events import (
    LIVE_ONLY,
    Alert,
    CheckpointSaved,
    Event,
    EventSink,
    Notice,
    RunStarted,
    State,
    StateChanged,
    StepMetrics,
    to_record,
)
from moe_core.parallel.experts import ExpertParallel
from moe_core.parallel.ranks import SINGLE, LostRank, RankFailed, Ranks, rng_state
from moe_core.store.runs import Run
from moe_core.train import checkpointing
from moe_core.train.checkpoint_writer import CheckpointWriter, Snapshot
from moe_core.train.control import Control
from moe_core.train.learner import Learner
from moe_core.train.steering import Steering
from moe_core.train.step_log import NonFiniteLoss, router_stats


class Trainer(Steering, Learner):
    def __init__(
        self,
        config: Config,
        run: Run,
        vocab: Vocab,
        ids: torch.Tensor,
        on_event: EventSink | None = None,
        ranks: Ranks = SINGLE,
        device: str | None = None,
    ):
        """A fresh trainer for `run`, touching no file. `Trainer.start` also resumes and joins the ranks."""
        super().__init__(config, vocab, ids, ranks, device)
        self.run_folder = run
        self.on_event = on_event or (lambda event: None)
        self.control = Control()
        self.writer = CheckpointWriter()
        self.state = State.STARTING
        self.resumed = False
        self.guard_stopped = False  # stopped by the guard (--on-alert stop): the exit code says so
        self._paused = self._done = False  # loop state of run()
        self._notices: list[Notice] = []  # found while setting up; emitted when run() starts
        self.best_written = self.best_val  # the validation loss of the `best` on disk

    @classmethod
    def start(
        cls,
        config: Config,
        run: Run,
        vocab: Vocab,
        ids: torch.Tensor,
        *,
        resume: bool,
        on_event: EventSink | None = None,
        ranks: Ranks = SINGLE,
        device: str | None = None,
        expert_parallel: bool = False,
    ) -> Trainer:
        """A trainer ready to `run()`: resumed from the run's newest checkpoint (`resume`; rank 0 reads it),
        with rank 0's weights and state on every rank, and with `expert_parallel` each rank's share of the
        experts (moe_core/parallel/experts.py)."""
        trainer = cls(config, run, vocab, ids, on_event, ranks, device)
        trainer.resumed = resume
        if resume and ranks.leader:  # the others get rank 0's state: only it reads the run folder
            at_step, trainer.pending_settings = checkpointing.resume(trainer, run, config, trainer.note)
            trainer.apply_settings(at_step)
        trainer._take_leaders_state()
        if expert_parallel:  # every rank holds the whole model now: each keeps its share of the experts
            trainer.expert_parallel = ExpertParallel(ranks, config, trainer.model, trainer.optimizer)
        trainer.best_written = trainer.best_val
        return trainer

    def forget_best(self) -> None:
        """A fork's first evaluation is its best so far, whatever its parent's was."""
        self.best_val = self.best_written = math.inf

    def note(self, level: str, message: str) -> None:
        self._notices.append(Notice(level, message, self.step_num))

    def save(self, best: bool = False) -> Path:
        """Write a checkpoint now: rank 0 writes it, every rank notes that its step is saved. (The loop's
        own saves are written by `self.writer`, off this thread.)"""
        state = self.state_dict(optimizer=not best)  # every rank takes part: its experts, with expert parallelism
        folder = self.snapshot(best, state).write() if self.ranks.leader else self.run_folder.checkpoints
        if not best:
            self.last_saved_step = self.step_num
        return folder

    def snapshot(self, best: bool, state: dict[str, Any], rank_rng: list | None = None) -> Snapshot:
        return checkpointing.snapshot(self.run_folder, self.config, state, best, rank_rng)

    # -- the loop ------------------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        if not self.ranks.leader:
            return
        if not isinstance(event, LIVE_ONLY):
            already_failing = self.run_folder.log_failing
            try:
                self.run_folder.log(to_record(event))
            except OSError as err:  # disk full: losing log lines is no reason to stop training
                if not already_failing:  # warn once, not at every event
                    self.on_event(
                        Notice(
                            "warning",
                            f"cannot write {self.run_folder.metrics_path.name} ({err}); "
                            "training goes on, metrics are not being logged",
                            self.step_num,
                        )
                    )
        self.on_event(event)

    def set_state(self, state: State, message: str = "") -> None:
        self.state = state
        self.emit(StateChanged(state, message))

    def run(self, serve_after_finish: bool = False) -> State:
        """Train to `max_iters`, acting on control commands between steps.

        With `serve_after_finish` (the dashboard) the loop stays alive after the last step, or after
        an error, answering sample/save/eval commands until `control.stop()`.
        """
        c = self.config
        serve_after_finish = self.ranks.from_leader(serve_after_finish)  # every rank loops as long as rank 0
        device = f"{self.device.split(':')[0]} x {self.ranks.world}" if self.ranks.parallel else self.device
        if self.expert_parallel:
            device += f", {self.expert_parallel.per_rank} experts each"
        self.emit(
            RunStarted(
                self.run_folder.name,
                c.dataset,
                device,
                self.params_total,
                self.params_active,
                self.step_num,
                c.max_iters,
                c.batch_size * c.block_size,
                len(self.vocab),
                self.resumed,
            )
        )
        for notice in self._notices:
            self.emit(notice)
        self._notices = []
        self.set_state(State.RUNNING)
        self._paused = self._done = False
        while True:
            try:
                outcome = self._tick(serve_after_finish)
            except LostRank:
                self._report_writes(wait=True)  # the snapshots taken before are good: on disk before leaving
                raise
            except (NonFiniteLoss, RuntimeError, OSError) as err:
                self._fail(err)
                if self.ranks.parallel and not isinstance(err, NonFiniteLoss):  # found on every rank alike
                    raise RankFailed(
                        f"process {self.ranks.rank} of {self.ranks.world} failed at step "
                        f"{self.step_num} ({str(err).splitlines()[0][:200]}); the others stop "
                        "too; resume from the last checkpoint"
                    ) from err
                if not serve_after_finish:
                    return State.ERROR
                self._done = True
                continue
            if outcome is not None:
                return outcome

    def _tick(self, serve_after_finish: bool) -> State | None:
        """Act on one command, or take one step; returns how `run()` ends, or None to go on."""
        self._report_writes()
        command = self.ranks.agree(self.control.next(wait=0.2 if (self._paused or self._done) else None))
        if command is not None:
            kind, arg = command
            if kind == "stop":
                self._checkpoint_quietly()
                self.set_state(State.STOPPED, str(arg or ""))
                return State.STOPPED
            if kind in ("pause", "resume", "toggle") and not self._done:
                self._paused = {"pause": True, "resume": False, "toggle": not self._paused}[kind]
                self.set_state(State.PAUSED if self._paused else State.RUNNING)
            elif kind == "set":
                self._serve_settings(*arg)
            elif kind == "alert":
                return self._raise_alert(arg)
            else:
                self._serve(kind, arg)
            return None
        if self._paused or self._done:
            return None
        if self.step_num >= self.config.max_iters:
            self._finish()
            self._done = True
            return None if serve_after_finish else State.FINISHED
        self._train_one()
        return None

    def _train_one(self) -> None:
        while self.pending_settings and self.pending_settings[0].step <= self.step_num:  # after a resume
            change = self.pending_settings.pop(0)  # made again, silently: its event is in the log already
            self.apply_settings({change.key: change.new})
        c = self.config
        t0 = time.perf_counter()
        self.step()
        s = self.step_num
        log_now = s % c.log_interval == 0 or s == c.max_iters
        if log_now:
            self._log(t0)
        seconds = time.perf_counter() - t0
        self.elapsed += seconds
        if log_now:
            self.window.clear()
        else:
            self.window.seconds += seconds
        if s % c.eval_interval == 0 and s < c.max_iters:
            self._serve("eval", None)
        if s % c.sample_interval == 0 and c.sample_tokens > 0 and s < c.max_iters:
            self._serve("sample", None)
        if s % c.ckpt_interval == 0 and s < c.max_iters:
            self._serve("save", None)

    def _log(self, step_started: float) -> None:
        """One StepMetrics for the steps since the last log line, and the last step's RouterStats."""
        rows = self.window.check(self.step_num, over_ranks=True)
        loss, aux, z, norm = rows.mean(dim=0).tolist()
        this_step = time.perf_counter() - step_started  # includes the read above
        seconds = self.window.seconds + this_step
        c = self.config
        self.emit(
            StepMetrics(
                self.step_num,
                loss,
                aux,
                z,
                self.optimizer.param_groups[0]["lr"],
                norm,
                len(rows) * c.batch_size * c.block_size / seconds,
                round(self.elapsed + this_step, 3),
            )
        )
        self.emit(router_stats(self.model, self.ranks, self.step_num))

    def _serve(self, kind: str, arg: object) -> None:
        """Evaluate, sample or save on request; the time spent counts towards `elapsed`."""
        t0 = time.perf_counter()
        previous = self.state
        if previous == State.ERROR and kind in ("eval", "save"):
            # After a failure the weights in memory may be NaN: never let them reach a checkpoint.
            self.emit(
                Notice(
                    "warning",
                    f"{kind} refused: training failed and the weights in memory are not "
                    "trusted; resume from the last checkpoint instead",
                    self.step_num,
                )
            )
            return
        try:
            if kind == "eval":
                self.set_state(State.EVALUATING)
                result, routes = self.evaluate()
                self.emit(result)
                self.emit(routes)
                if self.ranks.from_leader(result.val_loss < self.best_val):  # rank 0 knows of failed writes
                    self.best_val = result.val_loss
                    self._save_or_warn(best=True)
            elif kind == "sample" and self.expert_parallel:  # every rank sends rank 0 its experts
                with self.expert_parallel.whole_model() as here:
                    if here:
                        self._sample(arg)
            elif kind == "sample" and self.ranks.leader:
                self._sample(arg)
            elif kind == "save":
                self._save_or_warn(best=False)
            elif kind == "probe":
                self._probe(arg)
        except UserError as err:
            self.emit(Notice("warning", str(err), self.step_num))
        except NonFiniteLoss:
            raise  # a diverged run is a failure of training, not of this request
        except (RuntimeError, OSError, ValueError) as err:  # out of memory while sampling, disk full: the run goes on
            in_collectives = kind == "eval" or (
                self.expert_parallel is not None and kind in ("save", "sample", "probe")
            )
            if in_collectives and self.ranks.parallel and not isinstance(err, ValueError):
                raise  # unless the other ranks may be inside its collectives (experts gathered): see RankFailed
            self.emit(
                Notice("warning", f"{kind} failed at step {self.step_num}: {str(err).splitlines()[0]}", self.step_num)
            )
        finally:
            if self.state != State.ERROR:
                self.set_state(previous)
            if previous not in (State.PAUSED, State.FINISHED, State.ERROR):
                self.elapsed += time.perf_counter() - t0

    def _save_or_warn(self, best: bool) -> None:
        self.window.check(self.step_num)  # a step since the last log line may have diverged: never save that
        self.set_state(State.SAVING)
        # Every rank's own random streams, for a resume on as many processes (not for `best`, which is
        # never resumed from, and which rank 0 alone may decide to write again: no collective there).
        rank_rng = self.ranks.gather(rng_state(self.device)) if self.ranks.parallel and not best else None
        state = self.state_dict(optimizer=not best)  # every rank takes part: its experts, with expert parallelism
        if self.ranks.leader:
            self.writer.submit(self.snapshot(best, state, rank_rng))
        elif not best:
            self.last_saved_step = self.step_num  # rank 0 writes it

    def _report_writes(self, wait: bool = False) -> None:
        """Events for the checkpoints written since the last call (with `wait`, for all submitted)."""
        for snap, error in self.writer.outcomes(wait):
            if error is not None:  # a full disk, say: the run goes on
                if snap.best and self.best_val == snap.manifest["val_loss"]:  # no newer best taken since
                    self.best_val = self.best_written  # the next evaluation that beats what is on disk tries again
                self.emit(
                    Notice(
                        "warning",
                        f"could not save a checkpoint at step {snap.step} ({error}); "
                        "training goes on and the previous checkpoint is kept",
                        self.step_num,
                    )
                )
                continue
            if snap.best:
                self.best_written = snap.manifest["val_loss"]
            else:
                self.last_saved_step = snap.step
            self.emit(CheckpointSaved(snap.step, str(snap.folder), snap.best, snap.manifest["val_loss"]))

    def _checkpoint_quietly(self) -> None:
        self._report_writes(wait=True)
        if self.ranks.from_leader(self.unsaved) and self.state != State.ERROR:  # rank 0 knows of failed writes
            self._save_or_warn(best=False)
            self._report_writes(wait=True)

    def _finish(self) -> None:
        self._serve("eval", None)
        if self.config.sample_tokens > 0:
            self._serve("sample", None)
        self._checkpoint_quietly()
        self.set_state(State.FINISHED)

    def _fail(self, err: Exception) -> None:
        self.window.clear()
        self._report_writes(wait=True)  # the snapshots taken before the failure are good
        last = self.last_saved_step
        hint = f"the last good checkpoint (step {last}) is kept" if last >= 0 else "no checkpoint was saved yet"
        if isinstance(err, NonFiniteLoss):
            hint += "; resume with a lower --lr" if last >= 0 else "; try a lower --lr"
        if isinstance(err, NonFiniteLoss) and self.config.guard:  # the guard's rule, checked by the loop itself
            self.emit(Alert(self.step_num, "non_finite", str(err), "stop", max(0, last)))
        self.set_state(State.ERROR, str(err))
        self.emit(Notice("error", f"{err}. Training stopped; {hint}", self.step_num))
