"""Who runs a batch: a run holds a claim on it for as long as it runs, so no batch is run twice at once, and a run
whose process died is taken up by the next gateway that looks.

On one host the claim is a ``flock`` on a file per batch (``FileClaims``): the kernel lets it go with the process,
so it needs no renewing. Replicas on several hosts hold a lease in the shared database instead
(``pg_store.PgLeases``): it lasts ``serve.state.batch_lease_s`` unless renewed, which is what lets another replica
take over from one that was killed.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class Claim:
    """One batch held by this process."""

    renew_every: float | None = None
    """Seconds between renewals while the run goes on; None: held for as long as the process lives."""

    def renew(self) -> bool:
        """Hold it longer; whether it was still held (False: another took it, the run must stop)."""
        return True

    def release(self) -> None:
        raise NotImplementedError


class Claims:
    def claim(self, batch_id: str) -> Claim | None:
        """The batch held by this process, or None: another holds it."""
        raise NotImplementedError


class FileLock(Claim):
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def release(self) -> None:
        os.close(self.fd)


class FileClaims(Claims):
    """A lock file per batch under ``locks_dir``: the processes of one host."""

    def __init__(self, locks_dir: Path) -> None:
        self.locks_dir = locks_dir
        locks_dir.mkdir(exist_ok=True)

    def claim(self, batch_id: str) -> FileLock | None:
        fd = os.open(self.locks_dir / f"{batch_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return FileLock(fd)
