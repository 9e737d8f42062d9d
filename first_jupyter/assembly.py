"""The composition root: the one place that builds a gateway with its Batch API, and so the one module that
knows both. The gateway runs batches' lines but does not build their service, and the batch runner reaches the
gateway only through its public methods; each names the other only in its types."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from first_jupyter.batch.service import Batches
from first_jupyter.config import FirstConfig
from first_jupyter.gateway.core import Gateway
from first_jupyter.gateway.usage import UsageLog


def build_gateway(config: FirstConfig, data_dir: Path, environ: Mapping[str, str] | None = None, *,
                  shared: bool = False, usage: UsageLog | None = None) -> Gateway:
    """A gateway on ``config`` with its state under ``data_dir`` (``Gateway`` says what ``environ``, ``shared``
    and ``usage`` mean), its batches and files under ``data_dir/batches``."""
    return Gateway(config, data_dir, environ, shared=shared, usage=usage,
                   batches=lambda gateway: Batches(gateway, data_dir / "batches", config.defaults.batch))
