"""Exceptions raised by the client, one per `Error.error_type` the gateway sends."""

from __future__ import annotations

from splitserve.common.protocol import Error


class SplitserveError(Exception):
    """Base of every error the gateway reports; also raised for error types this client doesn't know."""

    error_type = "error"

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


class ValidationError(SplitserveError):
    error_type = "validation"


class OverloadedError(SplitserveError):
    error_type = "overloaded"


class GenerationTimeout(SplitserveError, TimeoutError):
    """The request ran past its `timeout`, on the client or at the gateway. Also a builtin TimeoutError."""

    error_type = "timeout"


class UnauthorizedError(SplitserveError):
    error_type = "unauthorized"


class GenerationError(SplitserveError):
    error_type = "generation"


class UnavailableError(SplitserveError):
    """No gateway or worker can take the request, or the client was closed while it ran."""

    error_type = "unavailable"


_BY_TYPE = {cls.error_type: cls for cls in (ValidationError, OverloadedError, GenerationTimeout, UnauthorizedError,
                                            GenerationError, UnavailableError)}


def error_from(msg: Error) -> SplitserveError:
    return _BY_TYPE.get(msg.error_type, SplitserveError)(msg.message, msg.id or None)
