"""Commands that read runs: `sample`, `runs`, `runs show`, `datasets`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from moe_core.data.corpus import default_data_dir, named_corpus_status
from moe_core.errors import UserError
from moe_core.live.lease import read_status
from moe_core.model.request import SampleRequest
from moe_core.store.runs import Run, default_runs_dir, list_run_names
from tui.options import DataDir, RunsDir

runs_app = typer.Typer(help="List runs, or show one with `moe-tui runs show RUN`.", invoke_without_command=True)


def sample(
    run: Annotated[str, typer.Argument(help="Run name (see `moe-tui runs`)")],
    *,
    prompt: Annotated[
        str, typer.Option(help="Text to continue; the output starts with it", show_default="a newline")
    ] = "\n",
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
    from moe_core.model.sampling import generate_text, load_model  # torch: for this command alone

    model, vocab, _ = load_model(
        Run.open(runs_dir or default_runs_dir(), run),
        checkpoint,
        device,
        on_skip=lambda why: print(f"warning: {why}", file=sys.stderr),
    )
    vocab.encode(prompt)  # unknown characters: a clear error before anything is printed
    out = sys.stdout
    texts = [prompt] * num_samples
    started, first = time.perf_counter(), None
    if num_samples == 1:
        out.write(prompt)
    for chars in generate_text(model, vocab, request):
        first = first or time.perf_counter()
        if num_samples == 1:  # stream character by character
            out.write(chars[0])
            out.flush()
        else:
            texts = [t + c for t, c in zip(texts, chars)]
    if num_samples == 1:
        out.write("\n")
    else:
        for i, text in enumerate(texts, 1):
            out.write(f"--- sample {i} ---\n{text}\n")
    if first is not None:  # how fast, on stderr: stdout stays the text alone
        seconds = time.perf_counter() - started
        print(
            f"sampled {num_samples} x {max_new_tokens} characters in {seconds:.2f} s on {next(model.parameters()).device}: "
            f"{num_samples * max_new_tokens / seconds:,.0f} characters/s, the first after "
            f"{(first - started) * 1e3:.1f} ms",
            file=sys.stderr,
        )


@runs_app.callback()
def runs(ctx: typer.Context, runs_dir: RunsDir = None) -> None:
    """List runs: name, state (live with its PID, finished, stopped, crashed), dataset, step, best val loss,
    parameters, last update."""
    ctx.obj = runs_dir or default_runs_dir()
    if ctx.invoked_subcommand is not None:
        return
    names = list_run_names(ctx.obj)
    console = Console()
    if not names:
        console.print(f"no runs in {Path(ctx.obj).resolve()} yet; start one with `moe-tui train`")
        return
    table = Table(
        "name", "from", "state", "dataset", "step", "best val", "params (active)", "updated", title=f"runs in {ctx.obj}"
    )
    for name in names:
        run = Run(Path(ctx.obj) / name)
        s = run.summary()
        best = f"{s['best_val']:.4f}" if s["best_val"] is not None else "-"
        params = f"{s['params'] / 1e6:.2f}M ({s['active'] / 1e6:.2f}M)" if s["params"] else "-"
        step = f"{s['step']}/{s['max_iters']}" if s["max_iters"] else str(s["step"])
        table.add_row(name, s["parent"] or "-", run_state(run), s["dataset"], step, best, params, s["updated"])
    console.print(table)


@runs_app.command("show")
def runs_show(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run name")],
    experts: Annotated[
        bool, typer.Option("--experts", help="Which characters each expert of the best checkpoint takes, per layer")
    ] = False,
    data_dir: DataDir = None,
) -> None:
    """Show one run: its config, progress, checkpoints and latest sample (or, with --experts, what its experts learned)."""
    r = Run.open(ctx.obj, run)
    if experts:
        show_experts(r, data_dir or default_data_dir())
        return
    s = r.summary()
    console = Console()
    console.print(f"[bold]{r.name}[/]  {r.path.resolve()}  ({run_state(r)})")
    console.print(
        f"dataset {s['dataset']} | step {s['step']}/{s['max_iters']} | best val "
        f"{s['best_val'] if s['best_val'] is None else round(s['best_val'], 4)} | updated {s['updated']}"
    )
    if s["params"]:
        console.print(f"parameters {s['params']:,} total, {s['active']:,} active per token")
    if lineage := r.lineage():
        changes = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in lineage["changed"].items())
        console.print(f"forked from {lineage['parent']} at step {lineage['step']} ({changes or 'no setting changed'})")
    console.print(r.config_path.read_text(encoding="utf-8"), markup=False, highlight=False)
    from moe_core.store.checkpoint import step_checkpoints

    ckpts = [p.name for _, p in step_checkpoints(r.checkpoints)]
    if r.best_checkpoint.is_dir():
        ckpts.append("best")
    console.print(f"checkpoints: {', '.join(ckpts) or 'none yet'}")
    from moe_core.track import where_written

    for line in where_written(r):
        console.print(f"tracked in {line}", markup=False, highlight=False)
    if r.samples_path.exists():
        last = r.samples_path.read_text(encoding="utf-8").rstrip().rsplit("--- step ", 1)[-1]
        console.print(f"latest sample, step {last}", markup=False, highlight=False)


def datasets(data_dir: DataDir = None) -> None:
    """List the named corpora and whether they are in the data cache."""
    directory = data_dir or default_data_dir()
    table = Table("name", "cached", "size", "file", "description", title=f"data dir: {Path(directory).resolve()}")
    for corpus, path, cached in named_corpus_status(directory):
        table.add_row(
            corpus.name,
            "yes" if cached else "no (downloads on first use)",
            f"{corpus.size / 1e6:.2f} MB",
            str(path),
            corpus.description,
        )
    Console().print(table)
    Console().print("Also accepted: any text file, a CSV file with --column NAME, or an http(s) URL of a text file.")


def run_state(run: Run) -> str:
    """live (PID), finished, stopped, error or crashed; for runs from before moe-tui kept leases, what
    their step says."""
    try:
        status = read_status(run)
    except UserError as err:  # another user's run: say so in the cell, list the rest
        return "not yours" if "another user" in str(err) else "?"
    if status.state != "unknown":
        return status.describe()
    summary = run.summary()
    return "finished" if summary["max_iters"] and summary["step"] >= summary["max_iters"] else "stopped"


def show_experts(run: Run, data_dir: Path) -> None:
    """Per layer, each expert's share, top characters by lift and importance, which experts go together and
    how alike they are, for the best checkpoint on the validation batches it was evaluated on."""
    from moe_core.probe.source import SavedModel
    from tui.render.experts import describe_layer

    event, probed = SavedModel.load(run, "best", data_dir).experts()
    console = Console()
    console.print(
        f"[bold]{run.name}[/]: what each expert does, best checkpoint (step {event.step}, validation loss "
        f"{probed.val_loss:.4f}), on the validation batches it was evaluated on"
    )
    if probed.importance is None:
        console.print("(importance: not measured: each token goes to every expert, so none can be switched off alone)")
    for layer in range(len(event.counts)):
        console.print()
        console.print(describe_layer(event, layer, None, console.width, probed=probed))
