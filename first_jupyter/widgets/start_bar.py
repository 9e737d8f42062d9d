"""A model's start as a widget: where it stands in words, and a bar filled by its estimate."""

from __future__ import annotations

import ipywidgets as widgets

from first_jupyter.protocol import Progress


class StartBar:
    """Hidden until a call waits for a model's start; then each ``Progress`` (from a thread of the call's: widget
    traits sync from any thread) updates the words and the bar, which runs as indeterminate (striped, full)
    while no start of the model has been timed. ``clear`` hides it again."""

    def __init__(self) -> None:
        self.bar = widgets.FloatProgress(min=0.0, max=1.0, layout=widgets.Layout(width="12em"))
        self.label = widgets.Label()
        self.widget = widgets.HBox([self.bar, self.label], layout=widgets.Layout(display="none"))
        self.last: Progress | None = None

    def show(self, progress: Progress) -> None:
        self.last = progress
        fraction = progress.fraction
        with self.bar.hold_sync():
            self.bar.value = 1.0 if fraction is None else fraction
            self.bar.bar_style = "info" if fraction is None else ""
        words = progress.words()
        self.label.value = words[0].upper() + words[1:]
        self.widget.layout.display = "flex"

    def clear(self) -> None:
        self.last = None
        self.widget.layout.display = "none"
        self.label.value = ""
        self.bar.value = 0.0
