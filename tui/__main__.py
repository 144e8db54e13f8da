"""`python -m tui` runs the moe-tui command line."""

from tui.cli import entry

entry()
