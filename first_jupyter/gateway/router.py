"""Resolve a requested model to the endpoint that will serve it.

Each model is served from the endpoints listed in config, or discovered from a FIRST gateway, tried in order;
the router is where the choice lives so that live state, load and failover can be added without touching
callers.
"""

from __future__ import annotations

from dataclasses import dataclass

from first_jupyter.gateway.backends.base import Backend
from first_jupyter.protocol import Capability, OpenAIError


@dataclass(frozen=True, slots=True)
class Target:
    model_id: str
    backend: Backend

    @property
    def cluster(self) -> str:
        return self.backend.cluster

    @property
    def endpoint(self) -> str:
        return self.backend.name


class Router:
    def __init__(self, backends: list[Backend], served: dict[str, list[str]]) -> None:
        """``served`` maps each model id to the names (``cluster/endpoint``) of the backends that serve it."""
        by_name = {f"{b.cluster}/{b.name}": b for b in backends}
        self.catalog: dict[str, list[Target]] = {
            model: [Target(model, by_name[name]) for name in names] for model, names in served.items()
        }
        self._known = ", ".join(sorted(self.catalog)) or "(none configured)"

    def serve(self, backend: Backend, model_ids: list[str]) -> None:
        """Make ``backend`` the server of exactly ``model_ids`` (a catalog it discovered), keeping the rest."""
        for model in list(self.catalog):
            kept = [t for t in self.catalog[model] if t.backend is not backend]
            if kept:
                self.catalog[model] = kept
            else:
                del self.catalog[model]
        for model in model_ids:
            self.catalog.setdefault(model, []).append(Target(model, backend))
        self._known = ", ".join(sorted(self.catalog)) or "(none configured)"

    def targets(self, model_id: str) -> list[Target]:
        """Where ``model_id`` is served; the 404 that lists the served models when nowhere."""
        targets = self.catalog.get(model_id)
        if not targets:
            asked = f"The model '{model_id}' does not exist here" if model_id else "The request names no model"
            raise OpenAIError(404, f"{asked}. Available models: {self._known}. Set 'model' to one of them "
                                   f"(GET /first/v1/models lists them).", param="model", code="model_not_found")
        return targets

    def pick(self, model_id: str, capability: Capability) -> Target:
        targets = self.targets(model_id)
        for target in targets:
            if target.backend.supports(model_id, capability):
                return target
        able = sorted(m for m, ts in self.catalog.items() if any(t.backend.supports(m, capability) for t in ts))
        raise OpenAIError(404, f"The model '{model_id}' cannot serve {capability.route}: no endpoint serving it "
                               f"has that route. Models that can: {', '.join(able) or 'none'}.",
                          param="model", code="unsupported_route")
