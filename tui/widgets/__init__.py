"""The dashboard's panels and the state they draw from."""

from .experts import ExpertPanel
from .loss_chart import LossChart
from .panels import EventsLog, SamplesPanel
from .state import DashboardState
from .status import StatusBar

__all__ = ["DashboardState", "EventsLog", "ExpertPanel", "LossChart", "SamplesPanel", "StatusBar"]
