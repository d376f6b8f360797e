"""Errors of the HTTP APIs: one exception, answered in the shape and status each API's clients expect."""

from __future__ import annotations

# error_type -> HTTP status, as TGI answers (its clients map the status and `error_type` to exceptions).
TGI_STATUS = {"validation": 422, "overloaded": 429, "generation": 424, "incomplete_generation": 500,
              "unavailable": 503, "timeout": 504, "unauthorized": 401, "payload_too_large": 413}

# error_type -> (HTTP status, OpenAI error type); the `openai` client picks its exception by status.
OPENAI_STATUS = {"validation": (400, "invalid_request_error"), "overloaded": (429, "rate_limit_error"),
                 "generation": (500, "server_error"), "incomplete_generation": (500, "server_error"),
                 "unavailable": (503, "service_unavailable"), "timeout": (504, "timeout"),
                 "unauthorized": (401, "authentication_error"),
                 "payload_too_large": (413, "invalid_request_error")}

# Seconds a refused client should wait (Retry-After on 429). Places free as fast as requests
# finish, which is sub-second for most; a second is a short wait that still sheds a retry storm.
RETRY_AFTER_S = 1


class ApiError(Exception):
    """A request refused or failed; `message` says what was wrong and, for a limit, what the limit is.
    `metered`: the request's metrics already count it (it reached the core)."""

    def __init__(self, error_type: str, message: str, param: str | None = None, metered: bool = False):
        super().__init__(message)
        self.error_type, self.message, self.param, self.metered = error_type, message, param, metered


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError("validation", message, param)


def retry_headers(e: ApiError) -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_S)} if e.error_type == "overloaded" else {}


def tgi_error(e: ApiError) -> tuple[int, dict]:
    return TGI_STATUS.get(e.error_type, 500), {"error": e.message, "error_type": e.error_type}


def openai_error(e: ApiError) -> tuple[int, dict]:
    status, kind = OPENAI_STATUS.get(e.error_type, (500, "server_error"))
    return status, {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.error_type}}
