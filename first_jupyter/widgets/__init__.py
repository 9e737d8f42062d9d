"""Notebook widgets: choose a gateway model, chat with it while its answer streams in, follow a batch.

Each displays as the last expression of a cell (``ChatWidget()``) and calls the gateway through
``first_jupyter.client``, so they work in a kernel the Jupyter server started and in plain IPython alike.
"""

from first_jupyter.widgets.batch import BatchMonitor
from first_jupyter.widgets.chat import ChatWidget
from first_jupyter.widgets.picker import ModelPicker

__all__ = ["BatchMonitor", "ChatWidget", "ModelPicker"]
