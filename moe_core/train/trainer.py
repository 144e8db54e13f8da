"""The training loop, driven by any front end through events out and a small control interface in.

    trainer = Trainer.start(config, run, vocab, ids, on_event=print, resume=False)
    trainer.control.pause()        # safe from any thread
    trainer.run()                  # returns "finished", "stopped" or "error"

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
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from moe_core.train import checkpointing
from moe_core.data.batches import Batches, evaluation_batches, split_ids
from moe_core.train.checkpoint_writer import CheckpointWriter, Snapshot
from moe_core.config import Config, resolve_device
from moe_core.train.control import Control
from moe_core.parallel.ranks import SINGLE, LostRank, RankFailed, Ranks, on_cpu, rng_state, set_rng_state
from moe_core.errors import UserError
from moe_core.events import LIVE_ONLY, CheckpointSaved, EvalMetrics, Event, EventSink, ExpertChars, Notice, RunStarted, Sample, StateChanged, StepMetrics, to_record
from moe_core.parallel.experts import ExpertParallel
from moe_core.model.transformer import MoETransformer
from moe_core.model.routes import RouteCounter
from moe_core.store.runs import Run
from moe_core.model.sampling import SampleRequest, complete
from moe_core.train.step_log import NonFiniteLoss, StepWindow, router_stats
from moe_core.data.vocab import Vocab


class Trainer:
    def __init__(self, config: Config, run: Run, vocab: Vocab, ids: torch.Tensor,
                 on_event: EventSink | None = None, ranks: Ranks = SINGLE, device: str | None = None):
        """A fresh model and optimizer for `run`, touching no file. `ranks` and `device` (`cuda:LOCAL_RANK`)
        come from `ranks.start` with several processes. `Trainer.start` also resumes and joins the ranks."""
        self.config, self.run_folder, self.vocab, self.ranks = config, run, vocab, ranks
        self.on_event = on_event or (lambda event: None)
        self.control = Control()
        self.writer = CheckpointWriter()
        self.device = device or resolve_device(config.device)
        self.state = "starting"

        self.train_ids, self.val_ids = split_ids(ids, config.val_fraction)
        shortest = min(len(self.train_ids), len(self.val_ids))
        if shortest <= config.block_size + 1:
            raise UserError(f"the corpus is too short: {len(ids)} characters leave {shortest} in the smaller "
                            f"split, and --block-size {config.block_size} needs more than "
                            f"{config.block_size + 1}; use a longer text or a smaller --block-size")

        torch.manual_seed(config.seed)
        with torch.device(self.device):  # initialised where it trains: on a GPU that takes no time
            self.model = MoETransformer(config, len(vocab))
        for moe in self.model.moe_layers():  # the load-balancing loss sees the global batch's routing
            moe.sum_over_ranks = ranks.sum if ranks.parallel else None
        self.params_total, self.params_active = self.model.num_params()
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.optimizer = self._make_optimizer()
        self.batches = Batches(self.train_ids, config.block_size, config.batch_size, config.seed, ranks.shard)
        # bf16 autocast on CUDA: matmuls at tensor-core speed, weights and optimizer stay fp32.
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.startswith("cuda")
                         else nullcontext())

        self.step_num = 0
        self.best_val = math.inf
        self.elapsed = 0.0  # training wall time, pauses excluded
        self.last_saved_step = -1
        self.resumed = False
        self.rank_rng: list | None = None  # every rank's random streams, from the checkpoint resumed
        self.expert_parallel: ExpertParallel | None = None
        self._paused = self._done = False  # loop state of run()
        self._notices: list[Notice] = []  # found while setting up; emitted when run() starts
        self.best_written = self.best_val  # the validation loss of the `best` on disk
        self.window = StepWindow(ranks)  # the steps since the last log line

    @classmethod
    def start(cls, config: Config, run: Run, vocab: Vocab, ids: torch.Tensor, *, resume: bool,
              on_event: EventSink | None = None, ranks: Ranks = SINGLE, device: str | None = None,
              expert_parallel: bool = False) -> Trainer:
        """A trainer ready to `run()`: resumed from the run's newest checkpoint (`resume`; rank 0 reads it),
        with rank 0's weights and state on every rank, and with `expert_parallel` each rank's share of the
        experts (moe_core/parallel/experts.py)."""
        trainer = cls(config, run, vocab, ids, on_event, ranks, device)
        trainer.resumed = resume
        if resume and ranks.leader:  # the others get rank 0's state: only it reads the run folder
            checkpointing.resume(trainer, run, config, trainer.note)
        trainer._take_leaders_state()
        if expert_parallel:  # every rank holds the whole model now: each keeps its share of the experts
            trainer.expert_parallel = ExpertParallel(ranks, config, trainer.model, trainer.optimizer)
        trainer.best_written = trainer.best_val
        return trainer

    # -- setup ---------------------------------------------------------------------------------

    def _make_optimizer(self) -> torch.optim.Optimizer:
        # Decay matrices only (nanoGPT): biases, LayerNorm gains and embeddings' scale stay free.
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": self.config.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.config.lr, betas=(0.9, 0.95), fused=True)

    def note(self, level: str, message: str) -> None:
        self._notices.append(Notice(level, message, self.step_num))

    # -- what a checkpoint holds -----------------------------------------------------------------

    def state_dict(self, optimizer: bool = True) -> dict[str, Any]:
        """{"model": weights, "training": everything else training needs to go on exactly}, plain tensors
        and values. `optimizer=False` leaves out Adam's moments (`best`, kept for sampling only: a third
        of the size). With expert parallelism a collective that every rank calls: each expert and its
        moments are gathered on rank 0."""
        training = {"optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state(),
                    "batches_rng": self.batches.generator.get_state(), "step": self.step_num,
                    "best_val": self.best_val, "elapsed": self.elapsed}
        if self.device.startswith("cuda"):
            training["cuda_rng"] = torch.cuda.get_rng_state()
        if not optimizer:
            del training["optimizer"]
        weights = self.model.state_dict()
        if self.expert_parallel is not None:
            weights, training = self.expert_parallel.whole_state(self.model, self.optimizer, training)
        return {"model": weights, "training": training}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The inverse of `state_dict()` (of a whole model: before the experts are shared out)."""
        training = state["training"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(training["optimizer"])
        for group in self.optimizer.param_groups:  # a resumed run may ask for a new --lr
            group["initial_lr"] = self.config.lr
        torch.set_rng_state(training["rng"])
        if self.device.startswith("cuda") and "cuda_rng" in training:
            torch.cuda.set_rng_state(training["cuda_rng"])
        self.batches.generator.set_state(training["batches_rng"])
        self.step_num = int(training["step"])
        self.best_val = float(training["best_val"])
        self.elapsed = float(training["elapsed"])
        self.last_saved_step = self.step_num  # it came from a checkpoint
        self.rank_rng = training.get("rank_rng")  # with several processes: every rank's own streams

    def _take_leaders_state(self) -> None:
        """Rank 0's weights and state (fresh, or just resumed) on every rank: only rank 0 reads the run folder."""
        if not self.ranks.parallel:
            return
        leaders = (self.state_dict(), self.last_saved_step, self.rank_rng) if self.ranks.leader else None
        state, last_saved, rank_rng = self.ranks.from_leader(on_cpu(leaders))
        if self.ranks.leader:
            return
        self.load_state_dict(state)
        self.last_saved_step = last_saved
        # Dropout and router noise draw from torch's stream: each rank needs its own, or every slice of
        # the batch would get the same masks. Rank 0 goes on with the run's; on a fresh start rank r seeds
        # from it and r. Step checkpoints keep every rank's stream, so a resume on as many processes draws
        # exactly what the uninterrupted run would have.
        if rank_rng is not None and len(rank_rng) == self.ranks.world:
            set_rng_state(rank_rng[self.ranks.rank], self.device)
        else:
            torch.manual_seed(int(torch.randint(2**62, (1,))) + self.ranks.rank)

    @property
    def unsaved(self) -> bool:
        """Steps taken since the last checkpoint (after a failed final save, say)."""
        return self.last_saved_step < self.step_num

    # -- the pieces a front end may call -------------------------------------------------------

    def lr_at(self, step: int) -> float:
        c = self.config
        if step < c.warmup_iters:
            return c.lr * (step + 1) / c.warmup_iters
        if c.lr_schedule == "constant":
            return c.lr
        progress = min(1.0, (step - c.warmup_iters) / max(1, c.max_iters - c.warmup_iters))
        floor = c.lr * c.min_lr_ratio
        return floor + 0.5 * (c.lr - floor) * (1 + math.cos(math.pi * progress))

    def step(self) -> None:
        """One optimizer step on one batch."""
        c = self.config
        lr = self.lr_at(self.step_num)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        x, y = self.batches.next(self.device)
        with self.autocast:
            out = self.forward(x, y)
        loss = out.loss + c.aux_loss_coef * out.aux_loss + c.z_loss_coef * out.z_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        limit = c.grad_clip if c.grad_clip > 0 else math.inf
        if self.expert_parallel:
            norm = self.expert_parallel.average_and_clip(self.model, limit)
        else:
            self.ranks.average_gradients(self.model)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit)
        self.optimizer.step()
        self.step_num += 1
        self.window.add(out.loss, out.aux_loss, out.z_loss, norm)

    @torch.no_grad()
    def evaluate(self) -> tuple[EvalMetrics, ExpertChars]:
        """Mean loss over `eval_iters` batches of each split, the same batches every time; and which
        characters each expert took in the validation batches."""
        self.model.eval()
        losses = []
        routes = RouteCounter(self.model, len(self.vocab))
        for i, ids in enumerate((self.train_ids, self.val_ids)):
            batches = evaluation_batches(ids, self.config, i, self.ranks.shard)
            total = torch.zeros((), device=self.device)
            # The validation split runs uncompiled, so that its routers can be hooked without a recompile.
            forward, recording = (self.model, routes.recording()) if i else (self.forward, nullcontext())
            with recording:
                for _ in range(self.config.eval_iters):
                    x, y = batches.next(self.device)
                    with self.autocast:
                        total += forward(x, y).loss
                    if i:
                        routes.add(x)
            losses.append(self.ranks.mean(total).item() / self.config.eval_iters)
        return (EvalMetrics(self.step_num, losses[0], losses[1], round(self.elapsed, 3)),
                ExpertChars(self.step_num, "".join(self.vocab.chars), self.ranks.sum(routes.counts).tolist()))

    def sample(self, request: SampleRequest) -> str:
        """Text that starts with the prompt (seeded by the step unless the request names a seed)."""
        return complete(self.model, self.vocab, request, default_seed=self.config.seed + self.step_num)[0]

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
                    self.on_event(Notice("warning", f"cannot write {self.run_folder.metrics_path.name} ({err}); "
                                                    "training goes on, metrics are not being logged", self.step_num))
        self.on_event(event)

    def set_state(self, state: str, message: str = "") -> None:
        self.state = state
        self.emit(StateChanged(state, message))

    def run(self, serve_after_finish: bool = False) -> str:
        """Train to `max_iters`, acting on control commands between steps.

        With `serve_after_finish` (the dashboard) the loop stays alive after the last step, or after
        an error, answering sample/save/eval commands until `control.stop()`.
        """
        c = self.config
        serve_after_finish = self.ranks.from_leader(serve_after_finish)  # every rank loops as long as rank 0
        device = f"{self.device.split(':')[0]} x {self.ranks.world}" if self.ranks.parallel else self.device
        if self.expert_parallel:
            device += f", {self.expert_parallel.per_rank} experts each"
        self.emit(RunStarted(self.run_folder.name, c.dataset, device, self.params_total, self.params_active,
                             self.step_num, c.max_iters, c.batch_size * c.block_size, len(self.vocab),
                             self.resumed))
        for notice in self._notices:
            self.emit(notice)
        self._notices = []
        self.set_state("running")
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
                    raise RankFailed(f"process {self.ranks.rank} of {self.ranks.world} failed at step "
                                     f"{self.step_num} ({str(err).splitlines()[0][:200]}); the others stop "
                                     "too; resume from the last checkpoint") from err
                if not serve_after_finish:
                    return "error"
                self._done = True
                continue
            if outcome is not None:
                return outcome

    def _tick(self, serve_after_finish: bool) -> str | None:
        """Act on one command, or take one step; returns how `run()` ends, or None to go on."""
        self._report_writes()
        command = self.ranks.agree(self.control.next(wait=0.2 if (self._paused or self._done) else None))
        if command is not None:
            kind, arg = command
            if kind == "stop":
                self._checkpoint_quietly()
                self.set_state("stopped", str(arg or ""))
                return "stopped"
            if kind in ("pause", "resume", "toggle") and not self._done:
                self._paused = {"pause": True, "resume": False, "toggle": not self._paused}[kind]
                self.set_state("paused" if self._paused else "running")
            else:
                self._serve(kind, arg)
            return None
        if self._paused or self._done:
            return None
        if self.step_num >= self.config.max_iters:
            self._finish()
            self._done = True
            return None if serve_after_finish else "finished"
        self._train_one()
        return None

    def _train_one(self) -> None:
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
        self.emit(StepMetrics(self.step_num, loss, aux, z, self.optimizer.param_groups[0]["lr"], norm,
                              len(rows) * c.batch_size * c.block_size / seconds, round(self.elapsed + this_step, 3)))
        self.emit(router_stats(self.model, self.ranks, self.step_num))

    def _serve(self, kind: str, arg: object) -> None:
        """Evaluate, sample or save on request; the time spent counts towards `elapsed`."""
        t0 = time.perf_counter()
        previous = self.state
        if previous == "error" and kind in ("eval", "save"):
            # After a failure the weights in memory may be NaN: never let them reach a checkpoint.
            self.emit(Notice("warning", f"{kind} refused: training failed and the weights in memory are not "
                                        "trusted; resume from the last checkpoint instead", self.step_num))
            return
        try:
            if kind == "eval":
                self.set_state("evaluating")
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
        except UserError as err:
            self.emit(Notice("warning", str(err), self.step_num))
        except NonFiniteLoss:
            raise  # a diverged run is a failure of training, not of this request
        except (RuntimeError, OSError, ValueError) as err:  # out of memory while sampling, disk full: the run goes on
            in_collectives = kind == "eval" or (self.expert_parallel is not None and kind in ("save", "sample"))
            if in_collectives and self.ranks.parallel and not isinstance(err, ValueError):
                raise  # unless the other ranks may be inside its collectives (experts gathered): see RankFailed
            self.emit(Notice("warning", f"{kind} failed at step {self.step_num}: {str(err).splitlines()[0]}",
                             self.step_num))
        finally:
            if self.state != "error":
                self.set_state(previous)
            if previous not in ("paused", "finished", "error"):
                self.elapsed += time.perf_counter() - t0

    def _sample(self, arg: object) -> None:
        self.set_state("sampling")
        request = arg if isinstance(arg, SampleRequest) else SampleRequest(
            prompt=self._default_prompt(), max_new_tokens=self.config.sample_tokens)
        text = self.sample(request)
        self.run_folder.append_sample(self.step_num, text)
        self.emit(Sample(self.step_num, request.prompt, text, isinstance(arg, SampleRequest), request.temperature))

    def _default_prompt(self) -> str:
        return "\n" if "\n" in self.vocab.chars else self.vocab.chars[0]

    def _save_or_warn(self, best: bool) -> None:
        self.window.check(self.step_num)  # a step since the last log line may have diverged: never save that
        self.set_state("saving")
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
                self.emit(Notice("warning", f"could not save a checkpoint at step {snap.step} ({error}); "
                                            "training goes on and the previous checkpoint is kept", self.step_num))
                continue
            if snap.best:
                self.best_written = snap.manifest["val_loss"]
            else:
                self.last_saved_step = snap.step
            self.emit(CheckpointSaved(snap.step, str(snap.folder), snap.best, snap.manifest["val_loss"]))

    def _checkpoint_quietly(self) -> None:
        self._report_writes(wait=True)
        if self.ranks.from_leader(self.unsaved) and self.state != "error":  # rank 0 knows of failed writes
            self._save_or_warn(best=False)
            self._report_writes(wait=True)

    def _finish(self) -> None:
        self._serve("eval", None)
        if self.config.sample_tokens > 0:
            self._serve("sample", None)
        self._checkpoint_quietly()
        self.set_state("finished")

    def _fail(self, err: Exception) -> None:
        self.window.clear()
        self._report_writes(wait=True)  # the snapshots taken before the failure are good
        last = self.last_saved_step
        hint = (f"the last good checkpoint (step {last}) is kept" if last >= 0 else "no checkpoint was saved yet")
        if isinstance(err, NonFiniteLoss):
            hint += "; resume with a lower --lr" if last >= 0 else "; try a lower --lr"
        self.set_state("error", str(err))
        self.emit(Notice("error", f"{err}. Training stopped; {hint}", self.step_num))
