"""The most tokens a request may ask of each model (its ``max_tokens``, or ``max_completion_tokens``).

A request for a billion tokens would keep an engine busy for hours, so it is refused before any work, with a 400
that names the ceiling. A model's ceiling is what its configuration says (``max_tokens`` of the model, on each
endpoint that serves it); where it says nothing, what its engines report of themselves (vLLM lists each model's
``max_model_len`` in ``/v1/models``, which the gateway reads with every status reading, and which no answer can
exceed). A model served by several endpoints gets the largest of theirs, so that no endpoint able to answer is
refused; one whose ceiling nobody states gets none.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from first_jupyter.config import ComputeEndpoint, FirstConfig, HttpEndpoint, LocalEndpoint
from first_jupyter.protocol import OpenAIError, ParsedRequest

ASKED_FIELDS = ("max_tokens", "max_completion_tokens")
LIMITS_KEY = "token_limits"
"""The key of an endpoint's status reading that holds what its engine reports: model id → ``max_model_len``."""


def reported_limits(listing: Any, public_ids: dict[str, str]) -> dict[str, int]:
    """From an engine's ``/v1/models`` answer, each model's ``max_model_len`` under its public id (``public_ids``:
    the engine's name → the id requests use); models that report none are left out."""
    entries = listing.get("data") if isinstance(listing, dict) else None
    limits: dict[str, int] = {}
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, dict):
            continue
        limit, model = entry.get("max_model_len"), public_ids.get(str(entry.get("id")))
        if model is not None and isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            limits[model] = limit
    return limits


class TokenCeilings:
    """Each model's ceiling, from the configuration and the engines' reports (``observe``)."""

    def __init__(self, config: FirstConfig) -> None:
        self._configured: dict[str, tuple[int, str]] = {}
        """Model → the largest configured ceiling, and the setting that says it."""
        for cluster_name, cluster in config.clusters.items():
            for e, endpoint in enumerate(cluster.endpoints):
                if not isinstance(endpoint, HttpEndpoint | LocalEndpoint | ComputeEndpoint):
                    continue  # a FIRST gateway: its models are discovered; the gateway behind it keeps their limits
                for m, model in enumerate(endpoint.models):
                    if model.max_tokens is not None and model.max_tokens > self._configured.get(model.id, (0, ""))[0]:
                        self._configured[model.id] = (model.max_tokens, f"clusters.{cluster_name}.endpoints[{e}]."
                                                                        f"models[{m}].max_tokens")
        self._reported: dict[tuple[str, str], dict[str, int]] = {}
        """(cluster, endpoint) → model → what its engine reported, as last read."""

    def observe(self, endpoints: Iterable[dict[str, Any]]) -> None:
        """Take what a status reading of these endpoints says their engines report."""
        for endpoint in endpoints:
            limits = endpoint.get(LIMITS_KEY)
            if isinstance(limits, dict):
                self._reported[(endpoint["cluster"], endpoint["endpoint"])] = limits

    def ceiling(self, model: str) -> tuple[int, str] | None:
        """The model's ceiling and where it comes from (for the error), or None where nobody states one."""
        if model in self._configured:
            return self._configured[model]
        reported = [(limits[model], where) for where, limits in self._reported.items() if model in limits]
        if not reported:
            return None
        limit, (cluster, endpoint) = max(reported)
        return limit, f"the max_model_len its engine on cluster '{cluster}' endpoint '{endpoint}' reports"

    def check(self, req: ParsedRequest) -> None:
        """Refuse (400) a request that asks for more tokens than its model's ceiling."""
        asked = [(value, name) for name in ASKED_FIELDS
                 if isinstance(value := req.data.get(name), int) and not isinstance(value, bool)]
        if not asked:
            return
        found = self.ceiling(req.model)
        if found is None:
            return
        limit, source = found
        for tokens, name in asked:
            if tokens > limit:
                raise OpenAIError(400, f"'{name}' is {tokens}, more than model '{req.model}' may be asked for: at "
                                       f"most {limit} tokens ({source}). Ask for {limit} or fewer.",
                                  param=name, code="max_tokens_too_large")
