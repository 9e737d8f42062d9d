"""Jupyter server extension serving the OpenAI API under ``{base_url}/first/``."""

from first_jupyter.server_ext.app import FirstExtension

__all__ = ["FirstExtension"]
