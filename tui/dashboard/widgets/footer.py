"""The key bar at the bottom of the screen: Textual's Footer, less a leak."""

from __future__ import annotations

from textual.widgets import Footer


class KeyFooter(Footer):
    """Textual's Footer rebuilds its keys whenever the keys that apply change (an evaluation greys Save
    and Eval out, the end of it brings them back), and each new key binds itself to the Footer's
    `compact`. Textual (8.2.8) forgets the bindings of keys it removed only when `compact` changes, which
    it never does here: every replaced key stayed in memory, a viewer of a run that evaluates often grew
    by megabytes an hour."""

    async def recompose(self) -> None:
        await super().recompose()
        self.mutate_reactive(Footer.compact)  # runs Textual's own clean-up of bindings to removed widgets
