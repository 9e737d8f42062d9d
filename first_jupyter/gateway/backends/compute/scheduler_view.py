"""A cluster's scheduler view, read through its login endpoint: which model jobs are queued, booting or running.

A Globus Compute endpoint reports workers only once a block's engine answers; for the 10 to 40 minutes before
that, its jobs sit in the batch queue or boot, and only the scheduler knows which. So a cluster may name a login
endpoint whose status function (``remote.scheduler``) runs ``qstat``/``pbsnodes`` or ``squeue``/``sinfo`` there;
the reading is shared by the cluster's endpoints, reused for ``every`` seconds, and never raises.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from first_jupyter.config import SchedulerView
from first_jupyter.gateway.backends.compute.submitter import Submitter
from first_jupyter.remote.scheduler import pbs_status, slurm_status, summarize

ENGINE_SUFFIX = "-HighThroughputExecutor"
"""``GlobusComputeEngine`` labels its executor ``<engine label>-HighThroughputExecutor``, and parsl names each block
job ``parsl.<executor label>.block-N.<time>``: the scheduler knows an endpoint's jobs by that label."""
JOB_STATES = {"running": "starting", "starting": "starting", "queued": "queued", "held": "queued"}
"""A job's state as the state of its endpoint's models while the endpoint has no workers yet: a running job is a
node booting its engine. Ending jobs serve nothing and are left out (the model is cold)."""


def job_label(endpoint_name: str) -> str:
    """The label an endpoint's block jobs carry (its engine is labelled ``first-<name>`` by ``first endpoint
    config``)."""
    return f"first-{endpoint_name}{ENGINE_SUFFIX}"


class SchedulerReader:
    def __init__(self, view: SchedulerView, submitter: Submitter, labels: dict[str, list[str]], where: str) -> None:
        """``labels``: each endpoint's job label → the models it serves."""
        self.view = view
        self._submitter = submitter
        self._labels = labels
        self._where = where
        self._last: dict[str, Any] = {"scheduler": view.kind, "jobs": [], "models": {}, "free_nodes": None,
                                      "checked": None, "errors": []}
        self._read_at = -view.every
        self._lock = asyncio.Lock()

    async def read(self) -> dict[str, Any]:
        """The last reading, read again when older than ``every`` (one reading at a time)."""
        async with self._lock:
            if time.monotonic() - self._read_at >= self.view.every:
                self._last = await self._read()
                self._read_at = time.monotonic()
            return self._last

    async def _read(self) -> dict[str, Any]:
        function = pbs_status if self.view.kind == "pbs" else slurm_status
        try:
            task = await self._submitter.submit(function, self._labels, self.view.queue)
            answer: dict[str, Any] = await asyncio.wait_for(asyncio.wrap_future(task), self.view.timeout)
        except TimeoutError:
            reason = f"no answer within {self.view.timeout:g} s"
        except Exception as exc:
            reason = self._submitter.describe(exc).message
        else:
            return answer
        return {**self._last, "errors": [{"message": f"The scheduler view of {self._where} could not be read: "
                                                     f"{reason}"}], "stale": True}

    async def close(self) -> None:
        await self._submitter.close()

    def jobs_of(self, endpoint_name: str) -> list[dict[str, Any]]:
        label = job_label(endpoint_name)
        return [job for job in self._last["jobs"] if job.get("label") == label]

    def model_states(self, endpoint_name: str, models: list[str]) -> dict[str, str]:
        """Each model's state by its endpoint's jobs (for an endpoint with no workers yet): starting, queued, or
        stopped when it has no job that will serve."""
        best = summarize(self.jobs_of(endpoint_name))
        return {model: JOB_STATES.get(best.get(model, ""), "stopped") for model in models}
