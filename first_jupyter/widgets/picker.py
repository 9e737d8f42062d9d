"""A dropdown of the gateway's models with their live state, for choosing the model a notebook talks to."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import ipywidgets as widgets

from first_jupyter import client
from first_jupyter.widgets.start_bar import StartBar

ERROR_COLOR = "var(--jp-error-color1, #d32f2f)"


def one_line(exc: BaseException) -> str:
    """An error as one plain line: a widget has no room for a traceback, and the gateway's own message already
    names the next step. Anything else keeps its type, which is then the only clue to what went wrong."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, client.GatewayError) else f"{type(exc).__name__}: {text}"


class ModelPicker:
    """The gateway's models in a dropdown, each labelled with its state (``tiny-chat (hot)``), so that a user sees
    before asking which model answers now and which waits for a cold start or a batch job. Warm starts the chosen
    model ahead of need, its start's progress shown under the dropdown (as is any call's wait for a start in a
    ``ChatWidget``).

    It starts on the gateway's default model. With ``set_default``, a choice also becomes the default of every
    client of the gateway (the magics, the sidebar, other notebooks). ``capability`` keeps only the models that
    can serve it (``None``: all). Displays as the last expression of a cell; ``widget`` is the box to embed.
    """

    def __init__(self, *, capability: str | None = "chat", set_default: bool = False) -> None:
        self.capability = capability
        self.set_default = set_default
        self.dropdown = widgets.Dropdown(description="Model", options=[], layout=widgets.Layout(width="auto"))
        self.refresh_button = widgets.Button(description="Refresh", icon="refresh",
                                             tooltip="Read the models and their state again")
        self.warm_button = widgets.Button(description="Warm", icon="fire",
                                          tooltip="Start the chosen model now, so that the first prompt finds it hot")
        self.error_line = widgets.Label(style={"text_color": ERROR_COLOR})
        self.start_bar = StartBar()
        self.widget = widgets.VBox([widgets.HBox([self.dropdown, self.refresh_button, self.warm_button]),
                                    self.start_bar.widget, self.error_line])
        self._warming: threading.Thread | None = None
        self._default: str | None = None
        self._quiet = False
        self.dropdown.observe(self._chosen, names="value")
        self.refresh_button.on_click(lambda _button: self.refresh())
        self.warm_button.on_click(lambda _button: self.warm())
        self.refresh()

    @property
    def value(self) -> str | None:
        """The chosen model id; None while the gateway lists no model with the capability."""
        chosen: str | None = self.dropdown.value
        return chosen

    @value.setter
    def value(self, model: str) -> None:
        self.dropdown.value = model

    def refresh(self) -> None:
        """Read the models, their state and the default again.

        The choice follows the gateway's default unless the user picked another model since the last read: a
        default changed elsewhere (``%first use``, the sidebar) shows up here, a deliberate choice is kept.
        """
        try:
            status = client.status()  # one call for the models and the default, which then agree
        except Exception as exc:  # a widget reports, it never raises into the frontend
            self.error_line.value = one_line(exc)
            return
        listed = [m for m in status["models"]
                  if self.capability is None or self.capability in m["capabilities"]["api_protocols"]]
        ids = [m["id"] for m in listed]
        current, default = self.dropdown.value, status["default_model"]
        if current in ids and current != self._default:
            chosen = current
        elif default in ids:
            chosen = default
        else:
            chosen = current if current in ids else next(iter(ids), None)
        with self._quietly(), self.dropdown.hold_sync():
            self.dropdown.options = [(f"{m['id']} ({m['state']})", m["id"]) for m in listed]
            self.dropdown.value = chosen
        self._default = default
        self.error_line.value = "" if ids else (
            f"The gateway serves no model that can {self.capability}; check its configuration.")

    def warm(self) -> threading.Thread | None:
        """Start the chosen model and wait for it in a thread (the kernel stays free), the bar telling how the
        start goes; the labels are read again once it is hot. The thread, to join; None with nothing chosen."""
        model = self.value
        if model is None:
            return None
        self.warm_button.disabled = True
        self._warming = threading.Thread(target=self._warm, args=(model,), name="first-picker-warm", daemon=True)
        self._warming.start()
        return self._warming

    def _warm(self, model: str) -> None:
        try:
            client.warm(model, wait=True, on_progress=self.start_bar.show)
        except Exception as exc:  # a widget reports, it never raises: here nothing would even show it
            self.error_line.value = one_line(exc)
        else:
            self.error_line.value = ""
        finally:
            self.start_bar.clear()
            self.warm_button.disabled = False
        self.refresh()

    @contextlib.contextmanager
    def _quietly(self) -> Iterator[None]:
        """Refreshing moves the value through the first option: none of these moves is the user's choice."""
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False

    def _chosen(self, change: dict[str, Any]) -> None:
        if self._quiet or not self.set_default or change["new"] is None:
            return
        try:
            self._default = client.set_default_model(change["new"])
        except Exception as exc:  # a widget reports, it never raises into the frontend
            self.error_line.value = one_line(exc)
        else:
            self.error_line.value = ""

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        """Displayed as its widget when it is the last expression of a cell."""
        bundle: dict[str, Any] | None = self.widget._repr_mimebundle_(**kwargs)
        return bundle
