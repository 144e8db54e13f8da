"""`moe-tui train`: flags -> Config -> Trainer -> a front end (dashboard, plain reporter, or detached)."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from moe_core.config import Config, build_config, diff_for_resume, read_toml, resolve_device, validate
from moe_core.data.corpus import default_data_dir, load_corpus
from moe_core.errors import UserError
from moe_core.events import Notice
from moe_core.parallel.experts import check_expert_parallel
from moe_core.data.vocab import Vocab
from moe_core.parallel import ranks as distributed
from moe_core.bus import EventBus
from moe_core.parallel.ranks import LostRank, RankFailed
from moe_core.live.host import LiveTraining
from moe_core.live.lease import RunLease, already_live_message, is_live, read_status
from moe_core.store.runs import Run, default_runs_dir
from moe_core.track import Tracking
from tui.detach import is_detached_child, move_output_to_log, output_to_log_once_live, start_detached
from moe_core.parallel.launch import LAUNCHED, launch
from tui.exits import HANGUP, move_output_after_hangup, print_next_step, signal_exit_code, stop_signals_handled
from moe_core.hints import resume_command, sample_command, stop_command, watch_command
from tui.options import DATA, MODEL, SCHEDULE, TRACKING, TRAINING, DataDir, RunsDir, opt


def train(
    dataset: Annotated[Optional[str], typer.Argument(help="shakespeare, simpsons, a text/CSV file, or an http(s) URL \\[default: shakespeare]", show_default=False)] = None,
    preset: Annotated[Optional[str], opt("seed | cpu | gpu \\[default: gpu on CUDA, else cpu]", TRAINING)] = None,
    config_file: Annotated[Optional[Path], opt("TOML file of settings (flags win)", TRAINING, "--config")] = None,
    n_layer: Annotated[Optional[int], opt("Transformer blocks")] = None,
    n_head: Annotated[Optional[int], opt("Attention heads")] = None,
    n_embd: Annotated[Optional[int], opt("Embedding width")] = None,
    block_size: Annotated[Optional[int], opt("Context length in characters")] = None,
    pos_encoding: Annotated[Optional[str], opt("learned | rope (rotary)")] = None,
    num_experts: Annotated[Optional[int], opt("Experts per MoE layer (1 = dense)")] = None,
    top_k: Annotated[Optional[int], opt("Experts per token")] = None,
    dense: Annotated[bool, opt("Dense baseline: one expert, same width", MODEL, "--dense")] = False,
    router: Annotated[Optional[str], opt("topk | noisy_topk")] = None,
    capacity_factor: Annotated[Optional[float], opt("Expert capacity factor (0 = dropless)")] = None,
    aux_loss_coef: Annotated[Optional[float], opt("Load-balancing loss weight")] = None,
    z_loss_coef: Annotated[Optional[float], opt("Router z-loss weight")] = None,
    init: Annotated[Optional[str], opt("kaiming | xavier | normal")] = None,
    dropout: Annotated[Optional[float], opt("Dropout rate")] = None,
    moe_impl: Annotated[Optional[str], opt("fast | reference (the textbook per-expert loop)")] = None,
    batch_size: Annotated[Optional[int], opt("Sequences per step", TRAINING)] = None,
    lr: Annotated[Optional[float], opt("Peak learning rate", TRAINING)] = None,
    lr_schedule: Annotated[Optional[str], opt("cosine | constant", TRAINING)] = None,
    warmup_iters: Annotated[Optional[int], opt("Linear warmup steps", TRAINING)] = None,
    max_iters: Annotated[Optional[int], opt("Training steps", TRAINING)] = None,
    weight_decay: Annotated[Optional[float], opt("AdamW weight decay", TRAINING)] = None,
    grad_clip: Annotated[Optional[float], opt("Gradient norm clip (0 = off)", TRAINING)] = None,
    seed: Annotated[Optional[int], opt("Random seed", TRAINING)] = None,
    device: Annotated[Optional[str], opt("auto | cpu | cuda | mps", TRAINING)] = None,
    compile: Annotated[Optional[bool], opt("torch.compile the model", TRAINING, "--compile/--no-compile")] = None,
    eval_interval: Annotated[Optional[int], opt("Steps between evaluations", SCHEDULE)] = None,
    eval_iters: Annotated[Optional[int], opt("Batches per evaluation", SCHEDULE)] = None,
    log_interval: Annotated[Optional[int], opt("Steps between log lines", SCHEDULE)] = None,
    sample_interval: Annotated[Optional[int], opt("Steps between generated samples", SCHEDULE)] = None,
    sample_tokens: Annotated[Optional[int], opt("Characters per periodic sample (0 = none)", SCHEDULE)] = None,
    ckpt_interval: Annotated[Optional[int], opt("Steps between checkpoints", SCHEDULE)] = None,
    keep_checkpoints: Annotated[Optional[int], opt("Step checkpoints kept (plus best)", SCHEDULE)] = None,
    column: Annotated[Optional[list[str]], opt("CSV column to train on (repeatable; joined as 'A: B')", DATA)] = None,
    encoding: Annotated[Optional[str], opt("Text encoding of the corpus \\[default: utf-8]", DATA)] = None,
    val_fraction: Annotated[Optional[float], opt("Share of the text held out for validation \\[default: 0.1]", DATA)] = None,
    run_name: Annotated[Optional[str], opt("Run folder name \\[default: <dataset>-<YYYYmmdd-HHMMSS>]", DATA)] = None,
    resume: Annotated[Optional[str], opt("Continue the run of this name from its latest checkpoint", DATA)] = None,
    overwrite: Annotated[bool, opt("Replace an existing run of the same name", DATA, "--overwrite")] = False,
    headless: Annotated[bool, opt("Plain log lines instead of the dashboard (automatic without a TTY)", DATA, "--headless")] = False,
    detach: Annotated[bool, opt("Train in the background, free of this terminal (output: RUN/train.log); watch with `moe-tui watch`", DATA, "--detach")] = False,
    on_hangup: Annotated[Optional[str], opt("keep | stop: what losing the terminal does \\[default: keep with the dashboard, stop with plain lines]", DATA)] = None,
    nproc: Annotated[Optional[int], opt("Processes to train on, data parallel (through torchrun; --batch-size is global) \\[default: 1]", TRAINING)] = None,
    expert_parallel: Annotated[bool, opt("With several processes, give each its share of the experts instead of all of them", TRAINING, "--expert-parallel")] = False,
    track: Annotated[Optional[list[str]], opt("Also send the run to tensorboard | mlflow | wandb | trackio (repeatable; each needs its extra: pip install 'moe-tui[NAME]')", TRACKING)] = None,
    track_project: Annotated[Optional[str], opt("Project (experiment) name in the trackers \\[default: moe-tui]", TRACKING)] = None,
    data_dir: DataDir = None,
    runs_dir: RunsDir = None,
) -> None:
    """Train a model (Ctrl-C saves a checkpoint and prints the command to resume)."""
    if on_hangup not in (None, "keep", "stop"):
        raise UserError(f"--on-hangup must be keep or stop, got {on_hangup!r}")
    launching = nproc is not None and not distributed.launched_by_torchrun()  # else: already a rank
    if nproc is not None and nproc < 1:
        raise UserError(f"--nproc must be a positive integer, got {nproc}")
    ranks = distributed.from_environment()
    if (launching and nproc > 1) or ranks.parallel:
        if on_hangup == "keep":
            raise UserError("--on-hangup keep needs a single process: torchrun stops every process when its "
                            "terminal goes; use --on-hangup stop (the default with --nproc), or start the run "
                            "in tmux or under nohup")
        on_hangup = "stop"  # each process saves, and all exit 129
    if detach and not is_detached_child():  # this process starts the trainer and returns; the child has both
        raise typer.Exit(start_detached(invocation_args()))
    flags = {k: v for k, v in locals().items() if v is not None and k in Config.__dataclass_fields__}
    if dense:
        flags.update(num_experts=1, top_k=1)
    if column:
        flags["columns"] = list(column)
    if track is not None:
        flags["track"] = list(track)
    data_dir = data_dir or default_data_dir()
    runs_dir = runs_dir or default_runs_dir()
    use_dashboard = (ranks.leader and not (headless or detach) and sys.stdout.isatty() and sys.stdin.isatty()
                     and _dashboard_available())
    torch_threads = None
    if use_dashboard:
        from tui.dashboard.sources import reserve_torch_threads

        torch_threads = reserve_torch_threads()  # before any torch work on this, the UI's, thread

    # What to train: checked and read, nothing written yet.
    if resume:
        if overwrite:
            raise UserError("--resume and --overwrite contradict each other; pick one")
        if run_name and run_name != resume:
            raise UserError("--run-name names a new run; with --resume the run keeps its own name")
        run = Run.open(runs_dir, resume)
        saved = run.load_config()
        requested = {**(read_toml(config_file) if config_file else {}), **flags}
        if dataset is not None:
            requested["dataset"] = dataset
        if preset is not None:
            requested["preset"] = preset
        allowed, refused = diff_for_resume(saved, requested)
        if refused:
            raise UserError(f"cannot resume '{resume}' with a different {', '.join(sorted(refused))}: that changes "
                            f"the model or its data; drop those flags (`{resume_command(resume, runs_dir)}`), or "
                            "start a new run")
        config = dataclasses.replace(saved, **allowed)
        validate(config)
        device = resolve_device(config.device)
        corpus = load_corpus(config.dataset, data_dir, columns=config.columns, encoding=config.encoding,
                             progress=_download_progress())
        vocab = run.load_vocab()
        if Vocab.from_text(corpus.text) != vocab:
            raise UserError(f"the text of '{config.dataset}' has changed since run '{resume}' started (its characters "
                            "differ); restore the original file or start a new run")
    else:
        file_values = read_toml(config_file) if config_file else {}
        if dataset is not None:
            flags["dataset"] = dataset
        config = build_config(preset, file_values, flags)
        device = resolve_device(config.device)
        corpus = load_corpus(config.dataset, data_dir, columns=config.columns, encoding=config.encoding,
                             progress=_download_progress())
        name = run_name or f"{corpus.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run = Run.prepare(runs_dir, name, overwrite) if ranks.leader else Run(runs_dir / name)
        vocab = Vocab.from_text(corpus.text)

    if expert_parallel:
        check_expert_parallel(config, nproc if launching else ranks.world)
    if launching:  # this process starts the ranks, each of which runs this command again
        _check_launch(nproc, config, device)
        args = [a for a in invocation_args()]
        args = _without_nproc(args) + ([] if resume or run_name else ["--run-name", run.name])
        if detach:  # the detached child: it and the ranks write to train.log once rank 0 trains
            output_to_log_once_live(run)
        raise typer.Exit(launch(nproc, args, _resume_hint(run.name, runs_dir, nproc, expert_parallel)))

    def new_trainer(run: Run):
        from moe_core.train.trainer import Trainer

        return Trainer.start(config, run, vocab, _encode(vocab, corpus.text), resume=bool(resume), ranks=ranks,
                             device=device, expert_parallel=expert_parallel)

    try:
        device = distributed.start(ranks, device, config.batch_size)  # with several ranks: join them
        if ranks.parallel and not ranks.leader:
            code = _train_as_follower(ranks, runs_dir, new_trainer)
        else:
            code = _train_as_leader(ranks, run, config, new_trainer, bool(resume), resume and allowed,
                                    overwrite, detach, use_dashboard, torch_threads, runs_dir, on_hangup)
        code = ranks.same_exit_code(code)
    except (LostRank, RankFailed) as err:
        # A rank that died is named by `--nproc`'s launcher, which knows which it was; one that hangs is not.
        if not (isinstance(err, LostRank) and not err.timed_out and os.environ.get(LAUNCHED)):
            print(f"error: {err}", file=sys.stderr)
        code = 1
    if ranks.parallel:
        distributed.leave(code)
    raise typer.Exit(code)


def _train_as_leader(ranks, run, config, new_trainer, resuming, changed, overwrite, detach,
                     use_dashboard, torch_threads, runs_dir, on_hangup) -> int:
    """One process, or rank 0 of several: the run folder, its lease, the front end."""
    try:
        lease = RunLease.acquire(run) if resuming else None  # before the trainer rewinds the run's files
    except UserError:
        ranks.from_leader(None)  # the others leave quietly: this rank says why
        raise
    ranks.from_leader(run.name)
    try:
        trainer = new_trainer(run)
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    if resuming:
        if changed:
            run.save_config(config)
    else:
        if overwrite and run.path.is_dir() and is_live(run):  # checked last: building the trainer takes a while
            raise UserError(already_live_message(run, read_status(run).pid))
        run.initialise(config, trainer.vocab, replace=overwrite)
        lease = RunLease.acquire(run)
    lease.activate()
    if detach:
        move_output_to_log(run, watch_command(run.name, runs_dir), stop_command(run.name, runs_dir))
    with LiveTraining(trainer, lease, EventBus()) as live, Tracking(config, run, live.bus) as tracking:
        finalise = lambda: (tracking.close(), live.close())  # noqa: E731 - before a forced exit after a hangup
        if use_dashboard:
            code = _run_dashboard(live, runs_dir, torch_threads, on_hangup or "keep", finalise)
            live.bus.subscribe(_notice_on_stderr)  # the screen is gone: the trackers' last words go to the terminal
            tracking.close()
        else:
            code = _run_headless(trainer, live.bus, runs_dir, on_hangup or "stop")
            tracking.close()  # while the reporter still prints its warnings
    return code


def _notice_on_stderr(event) -> None:
    if isinstance(event, Notice):
        print(f"{event.level}: {event.message}", file=sys.stderr)


def _train_as_follower(ranks, runs_dir, new_trainer) -> int:
    """Ranks 1..N-1: train in step with rank 0, writing and printing nothing. A stop signal sent to
    this process stops all ranks (see Ranks.agree); SIGHUP is rank 0's to act on."""
    name = ranks.from_leader(None)
    if name is None:  # rank 0 refused the run and says why: leave quietly
        distributed.leave(2)
    try:
        trainer = new_trainer(Run(runs_dir / name))
    except LostRank:  # rank 0 failed to set up (a corrupt checkpoint, say) and says why itself
        distributed.leave(1)
    if is_detached_child():
        output_to_log_once_live(Run(runs_dir / name))
    received: list[int] = []

    def on_signal(signum, frame):
        if signum != HANGUP:
            received.append(signum)
            trainer.control.stop(f"{signal.Signals(signum).name.replace('SIG', '').lower()} received by rank "
                                 f"{ranks.rank}")

    with stop_signals_handled(on_signal):
        outcome = trainer.run()
    if outcome == "stopped":
        return signal_exit_code(received[0]) if received else 0
    return 1 if outcome == "error" else 0


def _check_launch(nproc: int, config: Config, device: str) -> None:
    """What `--nproc` can refuse before any process starts."""
    import torch

    distributed.check_batch(config.batch_size, nproc)
    if device == "cuda":
        distributed.check_cuda_count(nproc, torch.cuda.device_count())
    if device == "mps" and nproc > 1:
        raise UserError("torch.distributed has no backend for Apple MPS; train several processes with "
                        "--device cpu, or one process on mps")


def _without_nproc(args: list[str]) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def invocation_args() -> list[str]:
    """The arguments of this `moe-tui` invocation (main() records them), to start it again detached."""
    from tui import cli

    return list(cli.INVOCATION)


def _encode(vocab: Vocab, text: str):
    import torch

    return torch.tensor(vocab.encode(text), dtype=torch.long)


def _dashboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("textual") is not None


def _run_dashboard(live, runs_dir: Path, torch_threads: int | None, on_hangup: str, finalise) -> int:
    from tui.dashboard.runner import run_dashboard

    name = live.trainer.run_folder.name
    return run_dashboard(live.trainer, _trainer_resume_hint(live.trainer, runs_dir), sample_command(name, runs_dir), torch_threads,
                         bus=live.bus, on_hangup=on_hangup, finalise=finalise)


def _resume_hint(name: str, runs_dir: Path, nproc: int, expert_parallel: bool) -> str:
    """The command that resumes a run on as many processes, laid out as before."""
    return (resume_command(name, runs_dir) + (f" --nproc {nproc}" if nproc > 1 else "")
            + (" --expert-parallel" if expert_parallel else ""))


def _trainer_resume_hint(trainer, runs_dir: Path) -> str:
    return _resume_hint(trainer.run_folder.name, runs_dir, trainer.ranks.world, trainer.expert_parallel is not None)


def _run_headless(trainer, bus, runs_dir: Path, on_hangup: str) -> int:
    from tui.headless import HeadlessReporter

    reporter = HeadlessReporter()
    bus.subscribe(reporter)
    received: list[int] = []

    def on_signal(signum, frame):
        if signum == HANGUP and on_hangup == "keep":
            move_output_after_hangup(trainer.run_folder)  # the terminal is gone; training goes on
            return
        if received and trainer.ranks.parallel:  # torchrun passing on the signal this process had already
            return
        if received:  # a second Ctrl-C: the user means it
            raise KeyboardInterrupt
        received.append(signum)
        trainer.control.stop(f"{signal.Signals(signum).name.replace('SIG', '').lower()} received")

    with stop_signals_handled(on_signal):
        try:
            outcome = trainer.run()
        finally:
            reporter.close()
    name = trainer.run_folder.name
    print_next_step(trainer, _trainer_resume_hint(trainer, runs_dir), sample_command(name, runs_dir))
    if outcome == "stopped":  # by a signal, or on request from a viewer or `moe-tui stop`
        return signal_exit_code(received[0]) if received else 0
    return 1 if outcome == "error" or trainer.unsaved else 0  # unsaved: finished, but the final save failed


def _download_progress():
    """A Rich progress bar for dataset downloads, shown only on a terminal."""
    console = Console(stderr=True)
    if not console.is_terminal:
        return None
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    state: dict[str, Any] = {}

    def update(done: int, total: int | None) -> None:
        if "bar" not in state:
            state["bar"] = Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(),
                                    console=console, transient=True)
            state["task"] = state["bar"].add_task("downloading", total=total)
            state["bar"].start()
        state["bar"].update(state["task"], completed=done)
        if total is not None and done >= total:
            state.pop("bar").stop()

    return update


