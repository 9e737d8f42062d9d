"""What went wrong with a Globus Compute call or task, as the OpenAI error a client gets.

Shared by both ways tasks are sent (the service, the engine run in-process): a task that failed on the node
raises ``TaskExecutionFailed`` either way, and the answer must carry the remote error's own words.
"""

from __future__ import annotations

import globus_sdk
from globus_compute_sdk.errors import TaskExecutionFailed

from first_jupyter.auth.tokens import AuthError
from first_jupyter.gateway.backends.compute.backend import SUBMIT_LIMIT_BYTES, remote_summary
from first_jupyter.protocol import OpenAIError


def describe_failure(exc: BaseException, where: str) -> OpenAIError:
    """A failed call or task as the OpenAI error to answer: what happened, in the remote side's own words."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, AuthError):
        return OpenAIError(401, str(exc), type="authentication_error", code="globus_sign_in")
    if isinstance(exc, TaskExecutionFailed):
        return OpenAIError(502, f"The task failed on {where}: {remote_summary(exc.remote_data)}", type="api_error",
                           code="remote_error")
    if isinstance(exc, globus_sdk.GlobusAPIError):
        said = f"Globus Compute answered HTTP {exc.http_status} for {where}: {exc.message or exc.code}"
        if exc.http_status == 401:
            return OpenAIError(401, f"{said}. Your Globus sign-in was refused: run `%first login` (or `first login` "
                                    "in a terminal) to sign in again.", type="authentication_error",
                               code="globus_sign_in")
        if exc.http_status == 403:
            return OpenAIError(403, f"{said}. Your Globus identity may not use this endpoint (or this function); "
                                    "ask the endpoint's administrators for access.", type="permission_error",
                               code="endpoint_forbidden")
        if exc.http_status == 413:
            return OpenAIError(413, f"{said}. The request is too large for a Globus Compute task "
                                    f"({SUBMIT_LIMIT_BYTES / 1e6:.0f} MB).", code="request_too_large")
        if exc.http_status == 429:
            return OpenAIError(429, f"{said}. Retry after a short wait.", type="rate_limit_error",
                               code="rate_limited")
        return OpenAIError(502, f"{said}.", type="api_error", code="upstream_error")
    return OpenAIError(502, f"The task failed on {where}: {type(exc).__name__}: {remote_summary(str(exc))}",
                       type="api_error", code="remote_error")
