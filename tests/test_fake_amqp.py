"""The loopback AMQP stub (``tests/fake_amqp.py``) against pika itself and against globus-compute-sdk's Executor.

The SDK test runs the real ``Client`` and ``Executor``: HTTP is answered by ``responses``; results come over real
AMQP from the stub, exactly as the SDK's ``_ResultWatcher`` thread takes them from the Globus Compute service.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import globus_sdk
import pika
import pytest
import responses
from globus_compute_common.messagepack import pack
from globus_compute_common.messagepack.message_types import Result
from globus_compute_common.messagepack.message_types.result import ResultErrorDetails
from globus_compute_sdk import Client, Executor
from globus_compute_sdk.errors import TaskExecutionFailed
from globus_compute_sdk.sdk.executor import _RESULT_WATCHERS, _ResultWatcher
from globus_compute_sdk.serialize import ComputeSerializer

from tests.fake_amqp import FakeAmqpBroker
from tests.fake_compute_service import COMPUTE
from tests.waiting import GUARD_S, eventually

QUEUE_PREFIX = "test_results_"



# --- the stub against pika's BlockingConnection --------------------------------------------------------------


def test_message_waits_for_a_consumer_and_unacked_ones_come_back(broker: FakeAmqpBroker) -> None:
    broker.deliver("q", b"early", pika.BasicProperties(headers={"k": "v"}))  # before anyone consumes: held
    first = pika.BlockingConnection(pika.URLParameters(broker.url))
    second = pika.BlockingConnection(pika.URLParameters(broker.url))  # several connections at once
    try:
        channel = first.channel()
        channel.basic_qos(prefetch_count=10)
        assert channel.queue_declare("q", passive=True).method.message_count == 1
        method, props, body = next(channel.consume("q", inactivity_timeout=GUARD_S))
        assert (body, props.headers, method.redelivered) == (b"early", {"k": "v"}, False)
        channel.close()  # without acking: the message goes back on the queue, marked redelivered

        other = second.channel()
        big = bytes(range(256)) * 2000  # larger than a frame: split into several body frames
        broker.deliver("q", big)
        got = [next(other.consume("q", inactivity_timeout=GUARD_S)) for _ in range(2)]
        assert [(m.redelivered, b) for m, _, b in got] == [(True, b"early"), (False, big)]
        other.basic_ack(got[-1][0].delivery_tag, multiple=True)
        broker.wait_until(lambda: len(broker.acked) == 2, GUARD_S)
        assert [m.body for m in broker.acked] == [b"early", big]
        other.basic_nack(0)  # nothing left to settle: no effect
        other.close()
    finally:
        first.close()  # Connection.Close answered with CloseOk: pika returns at once
        second.close()
    broker.wait_until(lambda: broker.connection_count() == 0, GUARD_S)


def test_stop_closes_open_connections(broker: FakeAmqpBroker) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(broker.url))
    channel = connection.channel()
    channel.basic_consume("q", lambda *_: None)
    broker.wait_until(lambda: broker.consumer_count("q") == 1, GUARD_S)
    broker.stop()  # the Connection.Close is sent and the socket closed before this returns
    with pytest.raises(pika.exceptions.ConnectionClosed):
        connection.process_data_events(time_limit=GUARD_S)  # returns (raising) as soon as it reads them
    assert connection.is_closed


# --- the stub behind globus-compute-sdk's Executor ------------------------------------------------------------


def double(x: int) -> int:
    return 2 * x


@pytest.fixture
def compute_service(broker: FakeAmqpBroker) -> Iterator[dict[str, str]]:
    """The Compute web service over ``responses``: registration, submission (one task id per submitted task, as the
    SDK requires) and the AMQP result URL, which points at the stub."""
    ids = {"endpoint": str(uuid.uuid4()), "function": str(uuid.uuid4()), "task_group": str(uuid.uuid4())}

    def submit(request: Any) -> tuple[int, dict[str, str], str]:
        asked = json.loads(request.body)["tasks"]
        answer = {"request_id": str(uuid.uuid4()), "task_group_id": ids["task_group"], "endpoint_id": ids["endpoint"],
                  "tasks": {fn: [str(uuid.uuid4()) for _ in batch] for fn, batch in asked.items()}}
        return 200, {"Content-Type": "application/json"}, json.dumps(answer)

    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        mock.add(responses.POST, f"{COMPUTE}/v3/functions", json={"function_uuid": ids["function"]})
        mock.add_callback(responses.POST, f"{COMPUTE}/v3/endpoints/{ids['endpoint']}/submit", callback=submit)
        mock.add(responses.GET, f"{COMPUTE}/v2/get_amqp_result_connection_url",
                 json={"queue_prefix": QUEUE_PREFIX, "connection_url": broker.url})
        yield ids


def _watchers() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if isinstance(t, _ResultWatcher)}


def test_executor_takes_results_and_errors_over_amqp(broker: FakeAmqpBroker, compute_service: dict[str, str]) -> None:
    started = time.monotonic()
    watchers_before = _watchers()
    client = Client(authorizer=globus_sdk.NullAuthorizer(), do_version_check=False)
    executor = Executor(endpoint_id=compute_service["endpoint"], client=client)
    try:
        ok, failing = executor.submit(double, 21), executor.submit(double, 0)
        eventually(lambda: ok.task_id and failing.task_id)  # set by the submitter thread from the submit response
        queue = f"{QUEUE_PREFIX}{compute_service['task_group']}"

        # the success result: Result.data is the endpoint's serialization of the return value
        broker.deliver(queue, pack(Result(task_id=uuid.UUID(ok.task_id), data=ComputeSerializer().serialize(42))))
        assert ok.result(timeout=GUARD_S) == 42

        # the failure: error_details set (Result.is_error); data is the remote traceback text;
        # the message's timestamp property becomes the exception's completion time
        traceback_text = "Traceback (most recent call last):\n  ...\nZeroDivisionError: division by zero\n"
        error = Result(task_id=uuid.UUID(failing.task_id), data=traceback_text, error_details=ResultErrorDetails(
            code="RemoteExecutionError", user_message="An error occurred during the execution of this task"))
        broker.deliver(queue, pack(error), pika.BasicProperties(timestamp=1700000000))
        with pytest.raises(TaskExecutionFailed) as raised:
            failing.result(timeout=GUARD_S)
        assert raised.value.remote_data == traceback_text
        assert raised.value.completion_t == "1700000000"
        assert "ZeroDivisionError: division by zero" in str(raised.value)

        broker.wait_until(lambda: len(broker.acked) == 2, GUARD_S)  # the watcher acks what it matched (every 0.5 s)
        assert not broker.nacked
    finally:
        executor.shutdown(wait=True, cancel_futures=True)

    # Executor.shutdown() stops only the submitter thread; the result watcher stays connected, idle, until
    # something calls its own shutdown (in the SDK: only a thread that waits for the main thread to end).
    # Left alone, it would outlive the broker and then retry connecting with 0.5-10 s sleeps between attempts.
    watcher = _RESULT_WATCHERS.get(uuid.UUID(compute_service["task_group"]))
    assert watcher is not None
    assert watcher.is_alive()
    shutdown_at = time.monotonic()
    watcher.shutdown(wait=True)  # no open futures: stops at its next 0.5 s tick, closing channel and connection
    eventually(lambda: not (_watchers() - watchers_before) and not executor._task_submitter.is_alive())
    broker.wait_until(lambda: broker.connection_count() == 0, GUARD_S)  # the watcher closed its connection itself
    print(f"SDK threads gone {time.monotonic() - shutdown_at:.2f}s after shutdown; "
          f"test body {time.monotonic() - started:.2f}s")
