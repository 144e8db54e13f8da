"""This invocation's arguments, recorded by `tui.cli.main`: `train --detach` starts itself again with
them, and `train --nproc N` starts its ranks with them."""

ARGS: list[str] = []
