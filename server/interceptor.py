"""One interceptor applies the error table (stagetune.errors.STATUS_OF) to every RPC.

A ``StagetuneError`` becomes its status code with its message; anything else is a bug:
it is logged with its traceback and the client gets ``INTERNAL`` with a generic message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

from stagetune.errors import StagetuneError, status_of

__all__ = ["ErrorInterceptor"]

_log = logging.getLogger(__name__)


class ErrorInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return inner(request, context)
            except StagetuneError as e:
                if status_of(e) == grpc.StatusCode.UNAVAILABLE:
                    _log.warning("%s: %s", method, e.message)
                context.abort(status_of(e), e.message)
            except Exception:
                _log.exception("internal error in %s", method)
                context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
