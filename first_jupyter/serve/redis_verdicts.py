"""Token introspection verdicts in Redis, shared by the replicas of a gateway on several hosts
(``serve.state.redis``), so that a token introspected by one replica is not introspected again by another within
its cache time.

A verdict is kept under the hash of its token, and sealed (AES-GCM) with a key derived from the token itself: an
accepted caller's verdict holds the Globus Compute token the gateway got on their behalf, which must be of no use
to whoever reads Redis. Only a replica that is sent the token can open its verdict, and a verdict cannot be moved
under another token's key. The entry expires with the verdict.

Best effort: Redis out of reach costs an introspection, never a request. The outage is logged once, when it starts.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from first_jupyter.auth.resource_server import Identity, Verdict
from first_jupyter.protocol import OpenAIError
from first_jupyter.serve.redis_state import UNREACHABLE, where

log = logging.getLogger(__name__)

PREFIX = "first:token:"
NONCE_BYTES = 12


def _sealer(token: str) -> AESGCM:
    """The key of a token's verdict: not its lookup key (the plain hash), which Redis holds."""
    return AESGCM(hashlib.sha256(b"first-jupyter verdict key\0" + token.encode()).digest())


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _encode(until: float, verdict: Verdict) -> bytes:
    if isinstance(verdict, OpenAIError):
        body: dict[str, Any] = {"error": {"status": verdict.status, "message": verdict.message, "type": verdict.type,
                                          "code": verdict.code, "headers": verdict.headers}}
    else:
        body = {"identity": {"id": verdict.id, "username": verdict.username, "service": verdict.service,
                             "expires_at": _finite(verdict.expires_at), "groups": sorted(verdict.groups),
                             "dependent": {rs: [token, _finite(exp)] for rs, (token, exp) in
                                           verdict.dependent.items()}}}
    return orjson.dumps({"until": until, **body})


def _decode(data: bytes) -> tuple[float, Verdict]:
    body = orjson.loads(data)
    if "error" in body:
        error = body["error"]
        return body["until"], OpenAIError(error["status"], error["message"], type=error["type"], code=error["code"],
                                          headers=error["headers"])
    who = body["identity"]
    return body["until"], Identity(who["id"], who["username"], who["service"], who["expires_at"] or math.inf,
                                   frozenset(who["groups"]),
                                   {rs: (token, exp or math.inf) for rs, (token, exp) in who["dependent"].items()})


class RedisVerdicts:
    """``resource_server.SharedVerdicts`` in Redis."""

    def __init__(self, client: redis.asyncio.Redis, url: str, clock: Callable[[], float] = time.time,
                 prefix: str = PREFIX) -> None:
        """``url``: for messages only. ``clock``: the introspector's, which the verdicts' times are on."""
        self._client = client
        self._url = url
        self._clock = clock
        self._prefix = prefix.encode()
        self._reachable = True

    async def get(self, key: bytes, token: str) -> tuple[float, Verdict] | None:
        try:
            sealed = await self._client.get(self._prefix + key.hex().encode())
        except UNREACHABLE as exc:
            self._lost(exc)
            return None
        self._reachable = True
        if sealed is None:
            return None
        try:
            return _decode(_sealer(token).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], key))
        except InvalidTag:  # not sealed with this token: written by no replica of this gateway
            return None

    async def put(self, key: bytes, token: str, until: float, verdict: Verdict) -> None:
        left_ms = int((until - self._clock()) * 1000)
        if left_ms <= 0:
            return
        nonce = os.urandom(NONCE_BYTES)
        sealed = nonce + _sealer(token).encrypt(nonce, _encode(until, verdict), key)
        try:
            await self._client.set(self._prefix + key.hex().encode(), sealed, px=left_ms)
        except UNREACHABLE as exc:
            self._lost(exc)

    def _lost(self, exc: BaseException) -> None:
        if self._reachable:
            log.warning("token verdicts are not shared while Redis at %s cannot be reached (%s): each replica "
                        "introspects for itself meanwhile", where(self._url), type(exc).__name__)
        self._reachable = False
