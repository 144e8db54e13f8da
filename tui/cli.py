"""The `moe-tui` command line: each command lives in a module of its own, assembled here.

Every user mistake surfaces as a `UserError`, printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import os
import sys

import typer

from moe_core.errors import UserError
from moe_core.parallel.launch import launched_by_torchrun
from tui import invocation
from tui.commands.bench import bench
from tui.commands.export import export
from tui.commands.live import stop, watch
from tui.commands.probe import probe
from tui.commands.report import report
from tui.commands.runs import datasets, runs_app, sample
from tui.commands.set import set_
from tui.commands.train import train

app = typer.Typer(
    help="Train and watch a sparse Mixture-of-Experts character language model.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
)
app.command(no_args_is_help=False)(train)
app.command()(watch)
app.command()(stop)
app.command(name="set")(set_)
app.command()(sample)
app.command()(probe)
app.add_typer(runs_app, name="runs")
app.command()(datasets)
app.command()(report)
app.command()(bench)
app.command()(export)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user errors into one line on stderr and exit code 2."""
    command = typer.main.get_command(app)
    invocation.ARGS[:] = sys.argv[1:] if argv is None else argv
    try:
        result = command.main(args=argv, prog_name="moe-tui", standalone_mode=False)
    except UserError as err:
        # Under torchrun the first process on each machine speaks for that machine's: theirs is the same error.
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        if launched_by_torchrun():  # only then other ranks to tell (ranks imports torch: not before)
            from moe_core.parallel.ranks import PeerFailed, report_setup_failure

            if not isinstance(err, PeerFailed):  # maybe on this rank alone (a file missing on its machine)
                report_setup_failure(str(err))
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
