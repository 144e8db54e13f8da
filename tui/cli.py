"""The `moe-tui` command line: train, sample, runs, datasets.

Flow: flags -> Config -> Trainer (moe_core) -> events -> reporter. Every user mistake surfaces as a
`UserError`, printed as one line on stderr with exit code 2.
"""

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
from rich.table import Table

from moe_core.config import Config, build_config, diff_for_resume, read_toml, resolve_device, validate
from moe_core.data import Vocab, default_data_dir, load_corpus, named_corpus_status
from moe_core.errors import UserError
from moe_core.runs import Run, default_runs_dir, list_run_names
from moe_core.sampling import SampleRequest, generate_text, load_model
from tui.exits import print_next_step, signal_exit_code, stop_signals_handled

app = typer.Typer(help="Train and watch a sparse Mixture-of-Experts character language model.",
                  no_args_is_help=True, rich_markup_mode="rich", add_completion=False)
runs_app = typer.Typer(help="List runs, or show one with `moe-tui runs show RUN`.", invoke_without_command=True)
app.add_typer(runs_app, name="runs")

MODEL = "Model"
TRAINING = "Training"
SCHEDULE = "Evaluation, sampling, checkpoints"
DATA = "Data and runs"

DataDir = Annotated[Optional[Path], typer.Option("--data-dir", help="Dataset cache [default: $MOE_TUI_DATA or ./data]", rich_help_panel=DATA)]
RunsDir = Annotated[Optional[Path], typer.Option("--runs-dir", help="Run output [default: $MOE_TUI_RUNS or ./runs]", rich_help_panel=DATA)]


def _opt(help: str, panel: str = MODEL, flag: str | None = None, **kw: Any) -> Any:
    names = [flag] if flag else []
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False, **kw)


@app.command(no_args_is_help=False)
def train(
    dataset: Annotated[Optional[str], typer.Argument(help="shakespeare, simpsons, a text/CSV file, or an http(s) URL [default: shakespeare]", show_default=False)] = None,
    preset: Annotated[Optional[str], _opt("seed | cpu | gpu [default: gpu on CUDA, else cpu]", TRAINING)] = None,
    config_file: Annotated[Optional[Path], _opt("TOML file of settings (flags win)", TRAINING, "--config")] = None,
    n_layer: Annotated[Optional[int], _opt("Transformer blocks")] = None,
    n_head: Annotated[Optional[int], _opt("Attention heads")] = None,
    n_embd: Annotated[Optional[int], _opt("Embedding width")] = None,
    block_size: Annotated[Optional[int], _opt("Context length in characters")] = None,
    pos_encoding: Annotated[Optional[str], _opt("learned | rope (rotary)")] = None,
    num_experts: Annotated[Optional[int], _opt("Experts per MoE layer (1 = dense)")] = None,
    top_k: Annotated[Optional[int], _opt("Experts per token")] = None,
    dense: Annotated[bool, _opt("Dense baseline: one expert, same width", MODEL, "--dense")] = False,
    router: Annotated[Optional[str], _opt("topk | noisy_topk")] = None,
    capacity_factor: Annotated[Optional[float], _opt("Expert capacity factor (0 = dropless)")] = None,
    aux_loss_coef: Annotated[Optional[float], _opt("Load-balancing loss weight")] = None,
    z_loss_coef: Annotated[Optional[float], _opt("Router z-loss weight")] = None,
    init: Annotated[Optional[str], _opt("kaiming | xavier | normal")] = None,
    dropout: Annotated[Optional[float], _opt("Dropout rate")] = None,
    moe_impl: Annotated[Optional[str], _opt("fast | reference (the textbook per-expert loop)")] = None,
    batch_size: Annotated[Optional[int], _opt("Sequences per step", TRAINING)] = None,
    lr: Annotated[Optional[float], _opt("Peak learning rate", TRAINING)] = None,
    lr_schedule: Annotated[Optional[str], _opt("cosine | constant", TRAINING)] = None,
    warmup_iters: Annotated[Optional[int], _opt("Linear warmup steps", TRAINING)] = None,
    max_iters: Annotated[Optional[int], _opt("Training steps", TRAINING)] = None,
    weight_decay: Annotated[Optional[float], _opt("AdamW weight decay", TRAINING)] = None,
    grad_clip: Annotated[Optional[float], _opt("Gradient norm clip (0 = off)", TRAINING)] = None,
    seed: Annotated[Optional[int], _opt("Random seed", TRAINING)] = None,
    device: Annotated[Optional[str], _opt("auto | cpu | cuda | mps", TRAINING)] = None,
    compile: Annotated[Optional[bool], _opt("torch.compile the model", TRAINING, "--compile/--no-compile")] = None,
    eval_interval: Annotated[Optional[int], _opt("Steps between evaluations", SCHEDULE)] = None,
    eval_iters: Annotated[Optional[int], _opt("Batches per evaluation", SCHEDULE)] = None,
    log_interval: Annotated[Optional[int], _opt("Steps between log lines", SCHEDULE)] = None,
    sample_interval: Annotated[Optional[int], _opt("Steps between generated samples", SCHEDULE)] = None,
    sample_tokens: Annotated[Optional[int], _opt("Characters per periodic sample (0 = none)", SCHEDULE)] = None,
    ckpt_interval: Annotated[Optional[int], _opt("Steps between checkpoints", SCHEDULE)] = None,
    keep_checkpoints: Annotated[Optional[int], _opt("Step checkpoints kept (plus best)", SCHEDULE)] = None,
    column: Annotated[Optional[list[str]], _opt("CSV column to train on (repeatable; joined as 'A: B')", DATA)] = None,
    encoding: Annotated[Optional[str], _opt("Text encoding of the corpus [default: utf-8]", DATA)] = None,
    val_fraction: Annotated[Optional[float], _opt("Share of the text held out for validation [default: 0.1]", DATA)] = None,
    run_name: Annotated[Optional[str], _opt("Run folder name [default: <dataset>-<YYYYmmdd-HHMMSS>]", DATA)] = None,
    resume: Annotated[Optional[str], _opt("Continue the run of this name from its latest checkpoint", DATA)] = None,
    overwrite: Annotated[bool, _opt("Replace an existing run of the same name", DATA, "--overwrite")] = False,
    headless: Annotated[bool, _opt("Plain log lines instead of the dashboard (automatic without a TTY)", DATA, "--headless")] = False,
    data_dir: DataDir = None,
    runs_dir: RunsDir = None,
) -> None:
    """Train a model (Ctrl-C saves a checkpoint and prints the command to resume)."""
    flags = {k: v for k, v in locals().items() if v is not None and k in Config.__dataclass_fields__}
    if dense:
        flags.update(num_experts=1, top_k=1)
    if column:
        flags["columns"] = list(column)
    data_dir = data_dir or default_data_dir()
    runs_dir = runs_dir or default_runs_dir()
    use_dashboard = not headless and sys.stdout.isatty() and sys.stdin.isatty() and _dashboard_available()
    torch_threads = None
    if use_dashboard:
        from tui.app import reserve_torch_threads

        torch_threads = reserve_torch_threads()  # before any torch work on this, the UI's, thread
    from moe_core.trainer import Trainer  # torch import: only when training

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
                            f"the model or its data; drop those flags (`{_resume_command(resume, runs_dir)}`), or "
                            "start a new run")
        config = dataclasses.replace(saved, **allowed)
        validate(config)
        resolve_device(config.device)
        corpus = load_corpus(config.dataset, data_dir, columns=config.columns, encoding=config.encoding,
                             progress=_download_progress())
        vocab = run.load_vocab()
        if Vocab.from_text(corpus.text) != vocab:
            raise UserError(f"the text of '{config.dataset}' has changed since run '{resume}' started (its characters "
                            "differ); restore the original file or start a new run")
        trainer = Trainer(config, run, vocab, _encode(vocab, corpus.text), resume=True)
        if allowed:
            run.save_config(config)
    else:
        file_values = read_toml(config_file) if config_file else {}
        if dataset is not None:
            flags["dataset"] = dataset
        config = build_config(preset, file_values, flags)
        corpus = load_corpus(config.dataset, data_dir, columns=config.columns, encoding=config.encoding,
                             progress=_download_progress())
        name = run_name or f"{corpus.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run = Run.prepare(runs_dir, name, overwrite)
        vocab = Vocab.from_text(corpus.text)
        trainer = Trainer(config, run, vocab, _encode(vocab, corpus.text))
        run.initialise(config, vocab)

    code = _run_dashboard(trainer, runs_dir, torch_threads) if use_dashboard else _run_headless(trainer, runs_dir)
    raise typer.Exit(code)


def _encode(vocab: Vocab, text: str):
    import torch

    return torch.tensor(vocab.encode(text), dtype=torch.long)


def _dashboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tui.app") is not None


def _run_dashboard(trainer, runs_dir: Path, torch_threads: int | None) -> int:
    from tui.app import run_dashboard

    name = trainer.run_dir.name
    return run_dashboard(trainer, _resume_command(name, runs_dir), _sample_command(name, runs_dir), torch_threads)


def _run_headless(trainer, runs_dir: Path) -> int:
    from tui.headless import HeadlessReporter

    reporter = HeadlessReporter()
    trainer.on_event = reporter
    received: list[int] = []

    def on_signal(signum, frame):
        if received:  # a second Ctrl-C: the user means it
            raise KeyboardInterrupt
        received.append(signum)
        trainer.control.stop(f"{signal.Signals(signum).name.replace('SIG', '').lower()} received")

    with stop_signals_handled(on_signal):
        try:
            outcome = trainer.run()
        finally:
            reporter.close()
    name = trainer.run_dir.name
    print_next_step(trainer, _resume_command(name, runs_dir), _sample_command(name, runs_dir))
    if outcome == "stopped":
        return signal_exit_code(received[0]) if received else 130
    return 1 if outcome == "error" or trainer.unsaved else 0  # unsaved: finished, but the final save failed


def _runs_dir_flag(runs_dir: Path) -> str:
    return "" if Path(runs_dir) == default_runs_dir() else f" --runs-dir {runs_dir}"


def _resume_command(name: str, runs_dir: Path) -> str:
    return f"moe-tui train --resume {name}{_runs_dir_flag(runs_dir)}"


def _sample_command(name: str, runs_dir: Path) -> str:
    return f"moe-tui sample {name}{_runs_dir_flag(runs_dir)}"


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


@app.command()
def sample(
    run: Annotated[str, typer.Argument(help="Run name (see `moe-tui runs`)")],
    prompt: Annotated[str, typer.Option(help="Text to continue; the output starts with it", show_default="a newline")] = "\n",
    max_new_tokens: Annotated[int, typer.Option(help="Characters to generate")] = 500,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy)")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option(help="Keep the k most likely characters", show_default=False)] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
    num_samples: Annotated[int, typer.Option(help="Independent samples")] = 1,
    checkpoint: Annotated[str, typer.Option(help="latest | best")] = "latest",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "auto",
    runs_dir: RunsDir = None,
) -> None:
    """Generate text from a run's checkpoint, with a KV cache; streams as it goes."""
    request = SampleRequest(prompt, max_new_tokens, temperature, top_k, top_p, seed, num_samples)
    request.check()
    model, vocab, _ = load_model(Run.open(runs_dir or default_runs_dir(), run), checkpoint, device,
                                 on_skip=lambda why: print(f"warning: {why}", file=sys.stderr))
    vocab.encode(prompt)  # unknown characters: a clear error before anything is printed
    out = sys.stdout
    if num_samples == 1:  # stream character by character
        out.write(prompt)
        for chars in generate_text(model, vocab, request):
            out.write(chars[0])
            out.flush()
        out.write("\n")
        return
    texts = [prompt] * num_samples
    for chars in generate_text(model, vocab, request):
        texts = [t + c for t, c in zip(texts, chars)]
    for i, text in enumerate(texts, 1):
        out.write(f"--- sample {i} ---\n{text}\n")


@app.command()
def bench(
    preset: Annotated[str, typer.Option(help="Model to measure: seed | cpu | gpu")] = "seed",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "cpu",
    steps: Annotated[int, typer.Option(help="Training steps per timed repeat")] = 10,
    repeats: Annotated[int, typer.Option(help="Interleaved repeats (the median is reported)")] = 5,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile both models")] = False,
    dashboard_steps: Annotated[int, typer.Option(help="Training steps per front end and round of the dashboard overhead measure (0 = skip it)")] = 60,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table")] = False,
) -> None:
    """Measure speed here: fast layers vs the textbook ones, MFU, KV-cache sampling, dashboard overhead."""
    import json

    from moe_core.bench import describe_machine, matmul_peak, sample_speed, train_speed

    for flag, value, least in (("--steps", steps, 1), ("--repeats", repeats, 1),
                               ("--dashboard-steps", dashboard_steps, 0)):
        if value < least:
            raise UserError(f"{flag} must be {'a positive integer' if least else '0 or more'}, got {value}")
    config = build_config(preset, {}, {"device": device, "compile": compile})
    where = resolve_device(device)
    # A line per phase on stderr, so a minute of measuring is not a silent one; stdout stays the result.
    # Plain lines, not a spinner: a redrawing thread would take CPU from what is being timed.
    say = Console(stderr=True, highlight=False, soft_wrap=True).print
    plain = watched = None
    if dashboard_steps:  # first: it needs this thread not to have run torch work on several threads yet
        from tui.overhead import ROUNDS, dashboard_overhead

        say(f"bench: dashboard overhead, {dashboard_steps} training steps x {ROUNDS} rounds with each front end ...")
        plain, watched = dashboard_overhead(config, steps=dashboard_steps)
    say(f"bench: training speed, fast vs textbook layers, {repeats} interleaved repeats of {steps} steps ...")
    train = train_speed(config, device=where, steps=steps, repeats=repeats, compile=compile)
    say("bench: matmul peak ...")
    peak = matmul_peak(where)
    say("bench: sampling speed, KV cache vs recomputing the window ...")
    sampling = sample_speed(config, device=where)
    mfu = train.fast_tokens_per_sec * train.flops_per_token / peak
    result = {
        "preset": preset, "device": where, "compile": compile,
        "train_tokens_per_sec": round(train.fast_tokens_per_sec, 1),
        "reference_tokens_per_sec": round(train.reference_tokens_per_sec, 1),
        "train_speedup": round(train.speedup, 3),
        "flops_per_token": train.flops_per_token, "matmul_peak_gflops": round(peak / 1e9, 2),
        "mfu": round(mfu, 4),
        "sample_chars_per_sec": round(sampling.cached_chars_per_sec, 1),
        "reference_sample_chars_per_sec": round(sampling.reference_chars_per_sec, 1),
        "sample_speedup": round(sampling.speedup, 2), "first_char_ms": round(sampling.first_char_ms, 2),
        "headless_tokens_per_sec": plain and round(plain, 1), "dashboard_tokens_per_sec": watched and round(watched, 1),
        "dashboard_overhead": plain and round(max(0.0, 1 - watched / plain), 4),
        "machine": describe_machine(where),
    }
    if json_out:
        print(json.dumps(result))
        return
    machine = result["machine"]
    table = Table("measure", "moe-tui", "textbook reference", "ratio", title=f"moe-tui bench: {preset} preset on {where}",
                  caption=f"{machine['processor']}, {machine['capability']}, {machine['threads']} torch threads, "
                          f"torch {machine['torch']}")
    table.add_row("training tokens/s", f"{train.fast_tokens_per_sec:,.0f}", f"{train.reference_tokens_per_sec:,.0f}",
                  f"{train.speedup:.2f}x")
    table.add_row("model FLOPs utilisation", f"{mfu:.1%}", "", f"of {peak / 1e9:,.1f} GFLOP/s matmul peak")
    table.add_row("sampling chars/s", f"{sampling.cached_chars_per_sec:,.0f}",
                  f"{sampling.reference_chars_per_sec:,.0f}", f"{sampling.speedup:.1f}x")
    table.add_row("time to first char", f"{sampling.first_char_ms:.1f} ms", "", "")
    if plain:
        table.add_row("training tokens/s, dashboard vs plain reporter", f"{watched:,.0f}", f"{plain:,.0f}",
                      f"{result['dashboard_overhead']:.1%} overhead")
    Console().print(table)


@runs_app.callback()
def runs(ctx: typer.Context, runs_dir: RunsDir = None) -> None:
    """List runs: name, dataset, step, best val loss, parameters, last update."""
    ctx.obj = runs_dir or default_runs_dir()
    if ctx.invoked_subcommand is not None:
        return
    names = list_run_names(ctx.obj)
    console = Console()
    if not names:
        console.print(f"no runs in {Path(ctx.obj).resolve()} yet; start one with `moe-tui train`")
        return
    table = Table("name", "dataset", "step", "best val", "params (active)", "updated", title=f"runs in {ctx.obj}")
    for name in names:
        s = Run(Path(ctx.obj) / name).summary()
        best = f"{s['best_val']:.4f}" if s["best_val"] is not None else "-"
        params = f"{s['params'] / 1e6:.2f}M ({s['active'] / 1e6:.2f}M)" if s["params"] else "-"
        step = f"{s['step']}/{s['max_iters']}" if s["max_iters"] else str(s["step"])
        table.add_row(name, s["dataset"], step, best, params, s["updated"])
    console.print(table)


@runs_app.command("show")
def runs_show(ctx: typer.Context, run: Annotated[str, typer.Argument(help="Run name")]) -> None:
    """Show one run: its config, progress, checkpoints and latest sample."""
    r = Run.open(ctx.obj, run)
    s = r.summary()
    console = Console()
    console.print(f"[bold]{r.name}[/]  {r.path.resolve()}")
    console.print(f"dataset {s['dataset']} | step {s['step']}/{s['max_iters']} | best val "
                  f"{s['best_val'] if s['best_val'] is None else round(s['best_val'], 4)} | updated {s['updated']}")
    if s["params"]:
        console.print(f"parameters {s['params']:,} total, {s['active']:,} active per token")
    console.print(r.config_path.read_text(encoding="utf-8"), markup=False, highlight=False)
    from moe_core.checkpoint import step_checkpoints

    ckpts = [p.name for _, p in step_checkpoints(r.checkpoints)]
    if r.best_checkpoint.is_dir():
        ckpts.append("best")
    console.print(f"checkpoints: {', '.join(ckpts) or 'none yet'}")
    if r.samples_path.exists():
        last = r.samples_path.read_text(encoding="utf-8").rstrip().rsplit("--- step ", 1)[-1]
        console.print(f"latest sample, step {last}", markup=False, highlight=False)


@app.command()
def datasets(data_dir: DataDir = None) -> None:
    """List the named corpora and whether they are in the data cache."""
    directory = data_dir or default_data_dir()
    table = Table("name", "cached", "size", "file", "description", title=f"data dir: {Path(directory).resolve()}")
    for corpus, path, cached in named_corpus_status(directory):
        table.add_row(corpus.name, "yes" if cached else "no (downloads on first use)",
                      f"{corpus.size / 1e6:.2f} MB", str(path), corpus.description)
    Console().print(table)
    Console().print("Also accepted: any text file, a CSV file with --column NAME, or an http(s) URL of a text file.")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user errors into one line on stderr and exit code 2."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="moe-tui", standalone_mode=False)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except typer.Exit as err:
        return err.exit_code
    except typer.TyperException as err:  # bad flags and arguments, from Typer's parser
        ctx = getattr(err, "ctx", None)
        where = ctx.command_path if ctx is not None else "moe-tui"
        cause = err.__cause__  # a value Typer could not convert: pydantic's error holds it
        got = f", got {cause.errors()[0]['input']!r}" if hasattr(cause, "errors") and cause.errors() else ""
        print(f"error: {err.format_message()}{got} (see `{where} --help`)", file=sys.stderr)
        return err.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `moe-tui sample RUN | head`: not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return result if isinstance(result, int) else 0


def entry() -> None:
    """The `moe-tui` console script."""
    sys.exit(main())
