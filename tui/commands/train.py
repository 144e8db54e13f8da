"""`moe-tui train`: flags -> a training session (moe_core/session) -> a front end (the dashboard, plain
log lines, or detached)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console

from moe_core.config import Config
from moe_core.errors import UserError
from moe_core.hints import stop_command, watch_command
from tui import invocation
from tui.detach import is_detached_child, move_output_to_log, output_to_log_once_live, start_detached
from tui.options import DATA, MODEL, SCHEDULE, TRACKING, TRAINING, DataDir, RunsDir, opt

if TYPE_CHECKING:  # imported where it trains: torch, which `moe-tui --help` must not wait for
    from moe_core.session.prepare import TrainRequest
    from moe_core.session.training import TrainingSession


def train(
    ctx: typer.Context,
    dataset: Annotated[
        Optional[str],
        typer.Argument(
            help="shakespeare, simpsons, a text/CSV file, or an http(s) URL \\[default: shakespeare]",
            show_default=False,
        ),
    ] = None,
    *,
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
    router_noise: Annotated[Optional[float], opt("Scale of noisy_topk's learned noise (0 = none)")] = None,
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
    val_fraction: Annotated[
        Optional[float], opt("Share of the text held out for validation \\[default: 0.1]", DATA)
    ] = None,
    run_name: Annotated[Optional[str], opt("Run folder name \\[default: <dataset>-<YYYYmmdd-HHMMSS>]", DATA)] = None,
    resume: Annotated[Optional[str], opt("Continue the run of this name from its latest checkpoint", DATA)] = None,
    fork: Annotated[
        Optional[str],
        opt("Start a new run from another's checkpoint: RUN, RUN@STEP or RUN@best (with live settings changed)", DATA),
    ] = None,
    overwrite: Annotated[bool, opt("Replace an existing run of the same name", DATA, "--overwrite")] = False,
    headless: Annotated[
        bool, opt("Plain log lines instead of the dashboard (automatic without a TTY)", DATA, "--headless")
    ] = False,
    detach: Annotated[
        bool,
        opt(
            "Train in the background, free of this terminal (output: RUN/train.log); watch with `moe-tui watch`",
            DATA,
            "--detach",
        ),
    ] = False,
    on_hangup: Annotated[
        Optional[str],
        opt(
            "keep | stop: what losing the terminal does \\[default: keep with the dashboard, stop with plain lines]",
            DATA,
        ),
    ] = None,
    nproc: Annotated[
        Optional[int],
        opt("Processes to train on, data parallel (through torchrun; --batch-size is global) \\[default: 1]", TRAINING),
    ] = None,
    expert_parallel: Annotated[
        bool,
        opt(
            "With several processes, give each its share of the experts instead of all of them",
            TRAINING,
            "--expert-parallel",
        ),
    ] = False,
    track: Annotated[
        Optional[list[str]],
        opt(
            "Also send the run to tensorboard | mlflow | wandb | trackio (repeatable; each needs its extra: pip install 'moe-tui[NAME]')",
            TRACKING,
        ),
    ] = None,
    track_project: Annotated[
        Optional[str], opt("Project (experiment) name in the trackers \\[default: moe-tui]", TRACKING)
    ] = None,
    guard: Annotated[
        Optional[str], opt("on | off: watch for dead experts, collapse, spikes, slow steps \\[default: on]", TRACKING)
    ] = None,
    on_alert: Annotated[
        Optional[str],
        opt("warn | pause | stop when the guard trips \\[default: pause on a screen or detached, else warn]", TRACKING),
    ] = None,
    data_dir: DataDir = None,
    runs_dir: RunsDir = None,
) -> None:
    """Train a model (Ctrl-C saves a checkpoint and prints the command to resume)."""
    if on_hangup not in (None, "keep", "stop"):
        raise UserError(f"--on-hangup must be keep or stop, got {on_hangup!r}")
    if detach and not is_detached_child():
        # This process starts the trainer and returns. The child checks everything and says what is wrong
        # through this one, so this one need not import torch (a second or two).
        raise typer.Exit(start_detached(list(invocation.ARGS)))
    from moe_core.session.training import TrainingSession

    session = TrainingSession(request_from_flags(ctx.params))
    if session.world > 1:
        if on_hangup == "keep":
            raise UserError(
                "--on-hangup keep needs a single process: torchrun stops every process when its "
                "terminal goes; use --on-hangup stop (the default with --nproc), or start the run "
                "in tmux or under nohup"
            )
        on_hangup = "stop"  # each process saves, and all exit 129
    use_dashboard = (
        session.ranks.leader
        and not (headless or detach)
        and sys.stdout.isatty()
        and sys.stdin.isatty()
        and importlib.util.find_spec("textual") is not None
    )
    torch_threads = _reserve_torch_threads() if use_dashboard else None  # before any torch work here
    plan = session.prepare(progress=_download_progress())
    if session.launching:  # this process starts the ranks, each of which runs this command again
        if detach:  # the detached child: it and the ranks write to train.log once rank 0 trains
            output_to_log_once_live(plan.run)
        raise typer.Exit(session.launch(list(invocation.ARGS)))
    if use_dashboard:
        from tui.dashboard.runner import train_with_dashboard

        front_end = lambda running: train_with_dashboard(running, torch_threads, on_hangup or "keep")  # noqa: E731
    else:
        from tui.headless import run_headless

        front_end = lambda running: run_headless(running, on_hangup or "stop")  # noqa: E731
    # What a guard alert does unless --on-alert says: on a screen, or detached (watch it to decide), pause and
    # wait for the user; plain lines in a pipe (CI, nohup) warn, for a paused run there would wait forever.
    on_alert = "pause" if use_dashboard or detach else "warn"
    raise typer.Exit(session.train(front_end, _on_live(session, detach), on_alert))


def request_from_flags(flags: dict[str, Any]) -> TrainRequest:
    """The flags of `train` as what the session trains: the Config keys given, and the rest."""
    from moe_core.session.prepare import TrainRequest

    flags = {k: None if v == () else v for k, v in flags.items()}  # Click's () for a repeatable flag not given
    if flags["guard"] is not None:
        if flags["guard"] not in ("on", "off"):
            raise UserError(f"--guard must be on or off, got {flags['guard']!r}")
        flags["guard"] = flags["guard"] == "on"
    settings = {k: v for k, v in flags.items() if v is not None and k in Config.__dataclass_fields__}
    if flags["dense"]:
        settings.update(num_experts=1, top_k=1)
    if flags["column"]:
        settings["columns"] = list(flags["column"])
    if flags["track"] is not None:
        settings["track"] = list(flags["track"])
    named = (
        "dataset",
        "preset",
        "config_file",
        "run_name",
        "resume",
        "fork",
        "overwrite",
        "data_dir",
        "runs_dir",
        "nproc",
    )
    return TrainRequest(settings=settings, expert_parallel=flags["expert_parallel"], **{k: flags[k] for k in named})


def _on_live(session: TrainingSession, detach: bool):
    """With --detach, once training is about to start: rank 0 says where it runs and moves its output to
    train.log; the other ranks move theirs once rank 0 trains."""

    def on_live(run) -> None:
        if detach and session.ranks.leader:
            runs_dir = session.request.runs_dir
            move_output_to_log(run, watch_command(run.name, runs_dir), stop_command(run.name, runs_dir))
        elif is_detached_child():
            output_to_log_once_live(run)

    return on_live


def _reserve_torch_threads() -> int:
    from tui.dashboard.sources import reserve_torch_threads

    return reserve_torch_threads()


def _download_progress():
    """A Rich progress bar for dataset downloads, shown only on a terminal."""
    console = Console(stderr=True)
    if not console.is_terminal:
        return None
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    state: dict[str, Any] = {}

    def update(done: int, total: int | None) -> None:
        if "bar" not in state:
            state["bar"] = Progress(
                *Progress.get_default_columns(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=console,
                transient=True,
            )
            state["task"] = state["bar"].add_task("downloading", total=total)
            state["bar"].start()
        state["bar"].update(state["task"], completed=done)
        if total is not None and done >= total:
            state.pop("bar").stop()

    return update
