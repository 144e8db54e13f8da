"""The dashboard's panels, each drawing from the `RunView` of the run in focus (tui/dashboard/run_view.py)."""
