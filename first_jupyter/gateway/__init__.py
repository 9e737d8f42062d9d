"""The gateway core: request validation, routing, backends, usage accounting."""

from first_jupyter.gateway.core import Gateway

__all__ = ["Gateway"]
