"""Domain errors and the one table that maps them to gRPC status codes.

The server raises these from any layer; one interceptor (server/interceptor.py) turns them
into a status code and a public message through ``STATUS_OF``. The typed client
(stagetune/client.py) turns the status code back into the same exception class through
``ERROR_OF``, so neither workers nor the CLI ever see a raw ``grpc.RpcError``.

Only the message of a ``StagetuneError`` crosses the wire; anything else the server raises
becomes ``INTERNAL`` with a generic message, and its details stay in the server log.
"""

from __future__ import annotations

import grpc

__all__ = [
    "StagetuneError",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "FailedPrecondition",
    "PermissionDenied",
    "Unauthenticated",
    "Unavailable",
    "DeadlineExceeded",
    "InternalError",
    "STATUS_OF",
    "ERROR_OF",
]


class StagetuneError(Exception):
    """Base of every error a stagetune server or client raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(StagetuneError):
    """A request or spec is malformed. ``field`` names the offending field (dotted path)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem


class NotFound(StagetuneError):
    """The study or trial does not exist (or is not visible to the caller)."""


class AlreadyExists(StagetuneError):
    """A study of that name exists with a different spec."""


class FailedPrecondition(StagetuneError):
    """The request is well formed but the target is not in a state that allows it,
    e.g. reporting on a trial whose lease was reaped or that already finished."""


class PermissionDenied(StagetuneError):
    """The caller is known but its role does not allow the call."""


class Unauthenticated(StagetuneError):
    """No credentials, or credentials the server does not accept."""


class Unavailable(StagetuneError):
    """The server or its storage is down or overloaded; the call may be retried."""


class DeadlineExceeded(StagetuneError):
    """The call did not finish within its deadline; it may or may not have taken effect."""


class InternalError(StagetuneError):
    """A server bug. The details are in the server log, never in the message."""


STATUS_OF: dict[type[StagetuneError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    InternalError: grpc.StatusCode.INTERNAL,
}

ERROR_OF: dict[grpc.StatusCode, type[StagetuneError]] = {
    code: error for error, code in STATUS_OF.items()
}


def status_of(error: StagetuneError) -> grpc.StatusCode:
    """The status code of an error, walking up its class hierarchy."""
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


def error_from_status(code: grpc.StatusCode, message: str) -> StagetuneError:
    """The domain error a client raises for a status received from a server."""
    cls = ERROR_OF.get(code, InternalError)
    if cls is InvalidArgument:
        field, sep, problem = message.partition(": ")
        return InvalidArgument(field, problem) if sep else InvalidArgument("", message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Unavailable(message)
    return cls(message)
