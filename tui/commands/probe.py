"""`moe-tui probe`: route a text through a run's checkpoint, switch experts off, see what changes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

from moe_core.errors import UserError
from moe_core.events import Probed, to_record
from moe_core.probe.request import Intervention, ProbeRequest, parse_masks
from moe_core.store.runs import Run, default_runs_dir
from tui.options import DataDir, RunsDir
from tui.render.probe import comparison, legend, routed_text, text_summary


def probe(
    run: Annotated[str, typer.Argument(help="Run name (see `moe-tui runs`)")],
    *,
    text: Annotated[Optional[str], typer.Option(help="Text to route through the model", show_default=False)] = None,
    file: Annotated[Optional[Path], typer.Option(help="Route this file's text instead", show_default=False)] = None,
    checkpoint: Annotated[str, typer.Option(help="latest | best | step-N")] = "latest",
    layer: Annotated[
        Optional[int], typer.Option(help="Show this layer only (from 1) \\[default: every layer]", show_default=False)
    ] = None,
    mask: Annotated[
        Optional[list[str]],
        typer.Option(
            help="Switch expert E off in layer L: L:E (layers from 1, experts from 0), or E in every layer; repeat for more",
            show_default=False,
        ),
    ] = None,
    top_k: Annotated[
        Optional[int], typer.Option(help="Route each token to this many experts (1: force top-1)", show_default=False)
    ] = None,
    capacity_factor: Annotated[
        Optional[float],
        typer.Option(help="Expert capacity at evaluation too (it is dropless otherwise)", show_default=False),
    ] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Validation loss and a sample, even with nothing changed")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the two samples compared")] = 0,
    sample_tokens: Annotated[int, typer.Option(help="Characters in each sample compared")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON, for scripts")] = False,
    runs_dir: RunsDir = None,
    data_dir: DataDir = None,
) -> None:
    """Route any text through a checkpoint: each character's experts, per layer, and its loss.

    With --mask, --top-k or --capacity-factor, the changed model beside the unchanged one."""
    target = Run.open(runs_dir or default_runs_dir(), run)
    config = target.load_config()
    change = Intervention(parse_masks(" ".join(mask or []), config.n_layer), top_k, capacity_factor)
    change.check(config.n_layer, config.num_experts, config.top_k)  # before the model loads: a quick answer
    request = ProbeRequest(read_text(text, file), change, compare, sample_tokens=sample_tokens, seed=seed)
    if not request.text and not (request.compare or request.intervention):
        raise UserError("nothing to probe: give --text TEXT or --file FILE (or --mask/--top-k/--compare)")
    if sample_tokens < 1:
        raise UserError(f"--sample-tokens must be a positive integer, got {sample_tokens}")
    if layer is not None and not 1 <= layer <= config.n_layer:
        raise UserError(f"--layer must be between 1 and {config.n_layer} (the model's layers), got {layer}")
    from moe_core.data.corpus import default_data_dir  # torch from here on: this command runs the model
    from moe_core.probe.source import SavedModel

    event = SavedModel.load(target, checkpoint, data_dir or default_data_dir()).probe(request)
    if as_json:
        print(json.dumps(as_table(event, target.name), ensure_ascii=False))
        return
    show(event, target.name, [layer - 1] if layer else list(range(config.n_layer)), config.num_experts)


def read_text(text: str | None, file: Path | None) -> str:
    if text is not None and file is not None:
        raise UserError("give --text or --file, not both")
    if file is None:
        return text or ""
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {file} ({err}); give a UTF-8 text file") from None


def as_table(event: Probed, run: str) -> dict:
    """One row per character: its loss, and per layer the experts chosen with their gates."""
    record = to_record(event)
    for key in ("event", "text", "experts", "gates", "loss", "request_id"):
        record.pop(key)
    record["run"] = run
    record["chars"] = [
        {
            "char": char,
            "loss": event.loss[i],
            "layers": [
                {"experts": experts[i], "gates": gates[i]} for experts, gates in zip(event.experts, event.gates)
            ],
        }
        for i, char in enumerate(event.text)
    ]
    return record


def show(event: Probed, run: str, layers: list[int], experts: int) -> None:
    console = Console(highlight=False)
    source = f"checkpoint {event.source} (step {event.step})"
    if event.text:
        console.print(Text(f"{run} · {source} · each character coloured by its first expert", style="bold"))
        console.print(legend(experts))
        for layer in layers:
            console.print()
            console.print(text_summary(event, layer, experts))
            console.print(routed_text(event, layer, console.width))
    if event.val_loss is not None:
        console.print()
        console.print(comparison(event))
    sys.stdout.flush()
