"""A stand-in for the Globus Compute service, for driving the real SDK end to end in tests.

Its HTTP side is ``responses`` callbacks answering the routes the SDK calls, in the shapes ``globus_sdk.testing``
documents; its results go out over AMQP through the loopback broker stub, as the service's do. Between the two it
does what an endpoint would: it unpacks each submitted task (the function as registered, the arguments as
submitted), runs it in a thread of this process (the "node": here, loopback) and publishes the packed ``Result``
to the task group's queue, an error ``Result`` with the traceback when the function raised.
"""

from __future__ import annotations

import json
import threading
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any

import globus_sdk
import responses
from globus_compute_common import messagepack
from globus_compute_common.messagepack.message_types import Result, ResultErrorDetails
from globus_compute_sdk.serialize import ComputeSerializer
from globus_sdk.testing import get_response_set

from tests.fake_amqp import FakeAmqpBroker

COMPUTE = "https://compute.api.globus.org"
QUEUE_PREFIX = "first-test-"


@dataclass
class FakeComputeService:
    broker: FakeAmqpBroker
    functions: dict[str, Any] = field(default_factory=dict)
    """Registered function id → the function, as the service would hand it to an endpoint."""
    submitted: list[dict[str, Any]] = field(default_factory=list)
    """Each submission's body."""
    status: dict[str, Any] = field(default_factory=lambda: dict(
        get_response_set(globus_sdk.ComputeClientV2.get_endpoint_status).lookup("default").json))
    refused: set[tuple[str, str]] = field(default_factory=set)
    """(endpoint id, bearer token) pairs whose submissions the service refuses (403: that identity may not use
    that endpoint)."""
    _serde: ComputeSerializer = field(default_factory=ComputeSerializer)
    _threads: list[threading.Thread] = field(default_factory=list)

    def install(self, mock: responses.RequestsMock, *endpoint_ids: str) -> None:
        """Answer the SDK's calls for ``endpoint_ids`` (the AMQP URL is the caller's: see ``amqp_url``)."""
        mock.add_callback(responses.POST, f"{COMPUTE}/v3/functions", callback=self._register)
        for endpoint_id in endpoint_ids:
            mock.add_callback(responses.POST, f"{COMPUTE}/v3/endpoints/{endpoint_id}/submit", callback=self._submit)
            mock.add_callback(responses.GET, f"{COMPUTE}/v2/endpoints/{endpoint_id}/status",
                              callback=lambda _: (200, {}, json.dumps(self.status)))

    def _register(self, request: Any) -> tuple[int, dict[str, str], str]:
        code = json.loads(request.body)["function_code"]
        function_id = str(uuid.uuid4())
        self.functions[function_id] = self._serde.deserialize(self._serde.unpack_buffers(code)[0])
        return 200, {}, json.dumps({"function_uuid": function_id})

    def _submit(self, request: Any) -> tuple[int, dict[str, str], str]:
        token = request.headers["Authorization"].removeprefix("Bearer ")
        if (request.url.split("/")[-2], token) in self.refused:
            return 403, {"Content-Type": "application/json"}, json.dumps({
                "code": "ENDPOINT_ACCESS_FORBIDDEN", "message": "You do not have access to this endpoint"})
        body = json.loads(request.body)
        self.submitted.append(body)
        group = body.get("task_group_id") or str(uuid.uuid4())
        tasks: dict[str, list[str]] = {}
        for function_id, payloads in body["tasks"].items():
            for payload in payloads:
                task_id = str(uuid.uuid4())
                tasks.setdefault(function_id, []).append(task_id)
                args, kwargs = (self._serde.deserialize(b) for b in self._serde.unpack_buffers(payload))
                runner = threading.Thread(target=self._run, args=(group, task_id, function_id, args, kwargs),
                                          daemon=True)
                self._threads.append(runner)
        for runner in self._threads:
            if not runner.is_alive() and runner.ident is None:
                runner.start()
        return 200, {}, json.dumps({"request_id": str(uuid.uuid4()), "task_group_id": group,
                                    "endpoint_id": request.url.split("/")[-2], "tasks": tasks})

    def _run(self, group: str, task_id: str, function_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            value = self.functions[function_id](*args, **kwargs)
            result = Result(task_id=uuid.UUID(task_id), data=self._serde.serialize(value))
        except Exception:
            result = Result(task_id=uuid.UUID(task_id), data=traceback.format_exc(), error_details=ResultErrorDetails(
                code="RemoteExecutionError", user_message="An error occurred during the execution of this task"))
        self.broker.deliver(f"{QUEUE_PREFIX}{group}", messagepack.pack(result))

    @staticmethod
    def amqp_url(mock: responses.RequestsMock, broker: FakeAmqpBroker) -> None:
        """Where the SDK's result thread connects: the broker, with this service's queue names."""
        mock.add(responses.GET, f"{COMPUTE}/v2/get_amqp_result_connection_url",
                 json={"queue_prefix": QUEUE_PREFIX, "connection_url": broker.url})

    def join(self, timeout: float = 30.0) -> None:
        for runner in self._threads:
            runner.join(timeout)
