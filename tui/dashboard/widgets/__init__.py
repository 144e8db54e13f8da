"""The dashboard's panels and the state they draw from."""

from tui.dashboard.widgets.experts import ExpertPanel
from tui.dashboard.widgets.loss_chart import LossChart
from tui.dashboard.widgets.panels import EventsLog, SamplesPanel
from tui.dashboard.widgets.state import DashboardState
from tui.dashboard.widgets.status import StatusBar

__all__ = ["DashboardState", "EventsLog", "ExpertPanel", "LossChart", "SamplesPanel", "StatusBar"]
