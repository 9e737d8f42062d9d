"""Accounting: every request the gateway answers (or refuses) becomes one usage record, and the usage answers are
read back from those records.

Records go to the usage log (SQLite under the data dir, or PostgreSQL shared by a facility's replicas), written
off the request path; a caller at a shared gateway (``caller.current``) is told of each, for its quotas.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from first_jupyter.api_types import UsageRow, UsageSummary
from first_jupyter.gateway.backends.base import Backend
from first_jupyter.gateway.caller import current
from first_jupyter.gateway.router import Router, Target
from first_jupyter.gateway.usage import PER_MODEL_KEYS, PER_USER_KEYS, LineUsage, UsageLog, UsageRecord
from first_jupyter.protocol import Capability, ParsedRequest


class Accounting:
    def __init__(self, usage: UsageLog, router: Router) -> None:
        self.usage = usage
        self._router = router
        """Only a model served somewhere (in its catalog) is recorded."""

    def record(self, req: ParsedRequest, target: Target | None, status: int, t0: float, ttft: float | None,
               prompt_tokens: int | None, completion_tokens: int | None, request_id: str,
               error: str | None) -> None:
        """Account one request, for the caller it is served for. A model served nowhere leaves no row: its name is
        whatever a client sent, and the usage store (and ``/first/api/usage``, the quotas) would keep and show it."""
        if req.model not in self._router.catalog:
            return
        caller = current()
        record = UsageRecord(  # positional: the fields in order, cheaper than keywords per request
            time.time(), request_id, req.model, target.cluster if target else "",
            target.endpoint if target else "", req.asked.value, req.stream, status, prompt_tokens,
            completion_tokens, (time.perf_counter() - t0) * 1000, (ttft - t0) * 1000 if ttft else None, error,
            caller.user if caller is not None else "")
        self.usage.record(record)
        if caller is not None:
            caller.recorded(record)

    def record_offloaded(self, batch_id: str, model: str, backend: Backend, capability: Capability,
                         latency_ms: float, lines: Sequence[LineUsage]) -> None:
        """Batch lines answered by a run-batch task on a cluster's nodes, accounted as requests this gateway sent
        would be: the owner's usage and quotas count a batch whichever way it ran (its run acts as the owner)."""
        caller = current()
        now, user = time.time(), caller.user if caller is not None else ""
        records = [UsageRecord(now, f"{batch_id}/{line.custom_id}", model, backend.cluster, backend.name,
                               capability.value, False, line.status, line.prompt_tokens, line.completion_tokens,
                               latency_ms, None, line.error, user) for line in lines]
        for record in records:
            self.usage.record(record)
        if caller is not None:
            caller.recorded_all(records)

    async def usage_summary(self, user: str | None = None) -> UsageSummary:
        """Requests, tokens and latency per model, from the usage store (recent requests included); ``user``: that
        user's requests only (a shared gateway's users each see their own)."""
        rows = await self.usage.per_model(user)
        summary = UsageSummary(object="list", data=[UsageRow.model_validate(dict(zip(PER_MODEL_KEYS, row, strict=True)))
                                                    for row in rows])
        if user is not None:
            summary.user = user
        return summary

    async def usage_by_user(self) -> dict[str, Any]:
        """Requests and tokens per user and model: a shared gateway's accounting, for its operators."""
        rows = await self.usage.per_user()
        return {"object": "list", "data": [dict(zip(PER_USER_KEYS, row, strict=True)) for row in rows]}
