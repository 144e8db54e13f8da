"""`moe-tui bench`: speed here, measured side by side (fast vs textbook layers, MFU, sampling, dashboard)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from moe_core.config import build_config, resolve_device
from moe_core.errors import UserError

ROUNDED = {
    "train_tokens_per_sec": 1,
    "reference_tokens_per_sec": 1,
    "train_speedup": 3,
    "matmul_peak_gflops": 2,
    "mfu": 4,
    "sample_chars_per_sec": 1,
    "reference_sample_chars_per_sec": 1,
    "sample_speedup": 2,
    "first_char_ms": 2,
    "headless_tokens_per_sec": 1,
    "dashboard_tokens_per_sec": 1,
    "dashboard_overhead": 4,
}  # digits kept in --json


def bench(
    *,
    preset: Annotated[str, typer.Option(help="Model to measure: seed | cpu | gpu")] = "seed",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "cpu",
    steps: Annotated[int, typer.Option(help="Training steps per timed repeat")] = 10,
    repeats: Annotated[int, typer.Option(help="Interleaved repeats (the median is reported)")] = 5,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile both models")] = False,
    dashboard_steps: Annotated[
        int, typer.Option(help="Training steps per front end and round of the dashboard overhead measure (0 = skip it)")
    ] = 60,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table")] = False,
) -> None:
    """Measure speed here: fast layers vs the textbook ones, MFU, KV-cache sampling, dashboard overhead."""
    for flag, value, least in (
        ("--steps", steps, 1),
        ("--repeats", repeats, 1),
        ("--dashboard-steps", dashboard_steps, 0),
    ):
        if value < least:
            raise UserError(f"{flag} must be {'a positive integer' if least else '0 or more'}, got {value}")
    result = measure(preset, device, steps, repeats, compile, dashboard_steps)
    if json_out:
        print(json.dumps({k: round(v, ROUNDED[k]) if k in ROUNDED and v else v for k, v in result.items()}))
    else:
        Console().print(result_table(result))


def measure(preset: str, device: str, steps: int, repeats: int, compile: bool, dashboard_steps: int) -> dict:
    """Every figure `bench` reports, by name (its --json object, unrounded)."""
    from moe_core.train.bench import describe_machine, matmul_peak, sample_speed, train_speed

    config = build_config(preset, {}, {"device": device, "compile": compile})
    where = resolve_device(device)
    # A line per phase on stderr, so a minute of measuring is not a silent one; stdout stays the result.
    # Plain lines, not a spinner: a redrawing thread would take CPU from what is being timed.
    say = Console(stderr=True, highlight=False, soft_wrap=True).print
    plain = watched = None
    if dashboard_steps:  # first: it needs this thread not to have run torch work on several threads yet
        from tui.dashboard.overhead import ROUNDS, dashboard_overhead

        say(f"bench: dashboard overhead, {dashboard_steps} training steps x {ROUNDS} rounds with each front end ...")
        plain, watched = dashboard_overhead(config, steps=dashboard_steps)
    say(f"bench: training speed, fast vs textbook layers, {repeats} interleaved repeats of {steps} steps ...")
    train = train_speed(config, device=where, steps=steps, repeats=repeats, compile=compile)
    say("bench: matmul peak ...")
    peak = matmul_peak(where)
    say("bench: sampling speed, KV cache vs recomputing the window ...")
    sampling = sample_speed(config, device=where)
    return {
        "preset": preset,
        "device": where,
        "compile": compile,
        "train_tokens_per_sec": train.fast_tokens_per_sec,
        "reference_tokens_per_sec": train.reference_tokens_per_sec,
        "train_speedup": train.speedup,
        "flops_per_token": train.flops_per_token,
        "matmul_peak_gflops": peak / 1e9,
        "mfu": train.fast_tokens_per_sec * train.flops_per_token / peak,
        "sample_chars_per_sec": sampling.cached_chars_per_sec,
        "reference_sample_chars_per_sec": sampling.reference_chars_per_sec,
        "sample_speedup": sampling.speedup,
        "first_char_ms": sampling.first_char_ms,
        "headless_tokens_per_sec": plain,
        "dashboard_tokens_per_sec": watched,
        "dashboard_overhead": plain and max(0.0, 1 - watched / plain),
        "machine": describe_machine(where),
    }


def result_table(r: dict) -> Table:
    """`measure`'s figures as the table `bench` prints: moe-tui beside the textbook reference."""
    machine = r["machine"]
    table = Table(
        "measure",
        "moe-tui",
        "textbook reference",
        "ratio",
        title=f"moe-tui bench: {r['preset']} preset on {r['device']}",
        caption=f"{machine['processor']}, {machine['capability']}, {machine['threads']} torch threads, "
        f"torch {machine['torch']}",
    )
    table.add_row(
        "training tokens/s",
        f"{r['train_tokens_per_sec']:,.0f}",
        f"{r['reference_tokens_per_sec']:,.0f}",
        f"{r['train_speedup']:.2f}x",
    )
    table.add_row(
        "model FLOPs utilisation", f"{r['mfu']:.1%}", "", f"of {r['matmul_peak_gflops']:,.1f} GFLOP/s matmul peak"
    )
    table.add_row(
        "sampling chars/s",
        f"{r['sample_chars_per_sec']:,.0f}",
        f"{r['reference_sample_chars_per_sec']:,.0f}",
        f"{r['sample_speedup']:.1f}x",
    )
    table.add_row("time to first char", f"{r['first_char_ms']:.1f} ms", "", "")
    if r["headless_tokens_per_sec"]:
        table.add_row(
            "training tokens/s, dashboard vs plain reporter",
            f"{r['dashboard_tokens_per_sec']:,.0f}",
            f"{r['headless_tokens_per_sec']:,.0f}",
            f"{r['dashboard_overhead']:.1%} overhead",
        )
    return table
