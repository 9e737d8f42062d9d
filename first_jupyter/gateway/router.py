"""Resolve a requested model to the endpoints that may serve it, best first.

Each model is served from the endpoints listed in config, or discovered from a FIRST gateway. Its candidates are
ordered by the time to first token each is expected to give: the wait its state implies (hot answers now, a cold
one must start a block), times the answers it has been giving (a moving average) scaled by what it already has in
flight. An endpoint that keeps failing before its first byte is kept out for a cooldown (a circuit breaker), so
requests stop paying its timeout; one that refuses the user (403) is left out for longer, as a cluster the user may
not use. The gateway fails over to the next candidate on such failures, never after a byte was sent.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

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


STATE_WAIT_S = {"hot": 0.0, "starting": 60.0, "queued": 300.0, "cold": 600.0, "offline": math.inf}
"""What a model's state at an endpoint adds to its time to first token, in seconds: a rough prior (a block start
on an HPC queue takes minutes); the observed averages decide among endpoints in the same state."""
FAILURES_TO_OPEN = 3
COOLDOWN_S = 30.0
FORBIDDEN_S = 600.0
"""How long an endpoint that refused this user (403: not in its allowed groups, no allocation) is left out: the
user's access rarely changes within minutes, and asking again costs a refused request each time."""
FIRST_TTFT_S = 0.5
"""The time to first token assumed of an endpoint never measured: optimistic, so a new one gets tried."""
EWMA_WEIGHT = 0.2


@dataclass(slots=True)
class Health:
    """What the router has seen of one endpoint."""

    in_flight: int = 0
    ttft_s: float = FIRST_TTFT_S
    failures: int = 0
    """Consecutive failures before a first byte; reset by any success."""
    open_until: float = 0.0
    """While in the future, the circuit is open: the endpoint is not tried (unless nothing else can serve)."""
    forbidden_until: float = 0.0
    """While in the future, the endpoint refused this user: it is not tried (unless nothing else can serve)."""
    last_error: str | None = None
    states: dict[str, str] = field(default_factory=dict)
    """Model → state (hot, starting, queued, cold, offline) from the last status reading."""

    def expected_s(self, model_id: str) -> float:
        wait = STATE_WAIT_S.get(self.states.get(model_id, "hot"), 0.0)
        return wait + self.ttft_s * (1 + self.in_flight)


class Router:
    def __init__(self, backends: list[Backend], served: dict[str, list[str]]) -> None:
        """``served`` maps each model id to the names (``cluster/endpoint``) of the backends that serve it."""
        by_name = {f"{b.cluster}/{b.name}": b for b in backends}
        self.catalog: dict[str, list[Target]] = {
            model: [Target(model, by_name[name]) for name in names] for model, names in served.items()
        }
        self._known = ", ".join(sorted(self.catalog)) or "(none configured)"
        self.health: dict[int, Health] = {id(b): Health() for b in backends}

    def health_of_backend(self, backend: Backend) -> Health:
        """Kept by backend (a discovered catalog adds targets later; their health starts empty)."""
        return self.health.setdefault(id(backend), Health())

    def health_of(self, target: Target) -> Health:
        return self.health_of_backend(target.backend)

    # -- what was seen ---------------------------------------------------------------------------------------

    def observe_state(self, backend: Backend, model_id: str, state: str) -> None:
        self.health_of_backend(backend).states[model_id] = state

    def began(self, target: Target) -> None:
        self.health_of(target).in_flight += 1

    def ended(self, target: Target) -> None:
        self.health_of(target).in_flight -= 1

    def succeeded(self, target: Target, ttft_s: float) -> None:
        health = self.health_of(target)
        health.failures, health.open_until, health.last_error = 0, 0.0, None
        health.ttft_s += EWMA_WEIGHT * (ttft_s - health.ttft_s)

    def forbid(self, target: Target, reason: str) -> None:
        """The endpoint refused this user (403): the clusters a user may use are learned, not configured twice."""
        health = self.health_of(target)
        health.forbidden_until, health.last_error = time.monotonic() + FORBIDDEN_S, reason

    def failed(self, target: Target, reason: str) -> None:
        """A failure before the first byte; the circuit opens after ``FAILURES_TO_OPEN`` in a row."""
        health = self.health_of(target)
        health.failures += 1
        health.last_error = reason
        if health.failures >= FAILURES_TO_OPEN:
            health.open_until = time.monotonic() + COOLDOWN_S

    # -- the choice ------------------------------------------------------------------------------------------

    def candidates(self, model_id: str, capability: Capability) -> list[Target]:
        """The endpoints to try for this request, best first; those with an open circuit only when nothing else
        can serve (then the one whose cooldown ends first)."""
        able = self._able(model_id, capability)
        now = time.monotonic()
        allowed = [t for t in able if self.health_of(t).forbidden_until <= now] or able  # none: let it say why
        closed = [t for t in allowed if self.health_of(t).open_until <= now]
        if not closed:
            return sorted(allowed, key=lambda t: self.health_of(t).open_until)[:1]
        return sorted(closed, key=lambda t: self.health_of(t).expected_s(model_id))  # stable: config order on ties

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

    def _able(self, model_id: str, capability: Capability) -> list[Target]:
        able = [t for t in self.targets(model_id) if t.backend.supports(model_id, capability)]
        if able:
            return able
        served = sorted(m for m, ts in self.catalog.items() if any(t.backend.supports(m, capability) for t in ts))
        raise OpenAIError(404, f"The model '{model_id}' cannot serve {capability.route}: no endpoint serving it "
                               f"has that route. Models that can: {', '.join(served) or 'none'}.",
                          param="model", code="unsupported_route")
