"""The key bar at the bottom of the screen: Textual's Footer, less a leak."""

from __future__ import annotations

from textual.widgets import Footer


class KeyFooter(Footer):
    """Textual's Footer rebuilds its keys at every refresh of the bindings, and the dashboard refreshes
    them at each change of the trainer's state (an evaluation greys Save and Eval out, its end brings
    them back). Each new key binds itself to the Footer's `compact`. Textual (8.2.8) forgets the bindings
    of keys it removed only when `compact` changes or the Footer closes, neither of which happens here:
    every replaced key stayed in memory, a viewer of a run that evaluates often grew by megabytes an hour."""

    async def recompose(self) -> None:
        await super().recompose()
        self.mutate_reactive(Footer.compact)  # runs Textual's own clean-up of bindings to removed widgets
