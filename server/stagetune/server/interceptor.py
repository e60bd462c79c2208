"""One interceptor authenticates each RPC (when auth is on) and applies the error table
(stagetune.contract.errors.STATUS_OF) to it.

A ``StagetuneError`` becomes its status code with its message; anything else is a bug:
it is logged with its traceback and the client gets ``INTERNAL`` with a generic message.

With a token table, every call to the stagetune services needs a bearer token
(``UNAUTHENTICATED`` otherwise), the caller's role must allow the service
(``PERMISSION_DENIED``), and the caller's identity is available to the servicers through
``server.auth.current_identity()`` while the call runs. Health and reflection stay open.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

from stagetune.contract.errors import StagetuneError, Unauthenticated, status_of
from stagetune.server.auth import PROTECTED_SERVICES, TokenTable, acting_as, authorize

__all__ = ["ErrorInterceptor"]

_log = logging.getLogger(__name__)


class ErrorInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, tokens: TokenTable | None = None) -> None:
        self._tokens = tokens

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        tokens = self._tokens
        protected = tokens is not None and method.lstrip("/").rpartition("/")[0] in (
            PROTECTED_SERVICES
        )
        if handler is None or handler.unary_unary is None:
            # Only unary calls are authenticated below: refuse anything else that would
            # reach a protected service (all their methods are unary) instead of letting it
            # through.
            return None if protected else handler
        inner = handler.unary_unary

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                if tokens is None or not protected:
                    return inner(request, context)
                identity = tokens.authenticate(context.invocation_metadata())
                authorize(identity, method)
                with acting_as(identity):
                    return inner(request, context)
            except Unauthenticated as e:
                _log.info("%s: refused a call from %s: %s", method, context.peer(), e.message)
                context.abort(status_of(e), e.message)
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
