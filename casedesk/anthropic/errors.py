"""Anthropic error values: a status, an error type and a message, rendered in one place.

Errors are raised where the problem is found (`raise invalid_request("...")`) and turned into
the Anthropic JSON body by the HTTP handler, so every failure a client sees has the same shape.
"""

from __future__ import annotations

import orjson

# Status → Anthropic error type, from the public API reference (docs/anthropic-api.md §1).
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "api_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


DEFAULT_RETRY_AFTER = 1  # seconds, on every 429 and 529 that does not say otherwise


class ApiError(Exception):
    """A failure the client should see as an Anthropic error response."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or ERROR_TYPES.get(status, "api_error")
        if status in (429, 529) and not any(name == "retry-after" for name, _ in headers):
            # "Back off and retry": the SDKs wait what retry-after says (docs/anthropic-api.md §1).
            headers = (*headers, ("retry-after", str(DEFAULT_RETRY_AFTER)))
        self.headers = headers

    def body(self) -> bytes:
        return error_body(self.error_type, self.message)

    def sse_event(self) -> bytes:
        """The same error as an `event: error` for a stream that already sent its 200."""
        return b"event: error\ndata: " + self.body() + b"\n\n"


def error_body(error_type: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})


def invalid_request(message: str) -> ApiError:
    return ApiError(400, message)


def not_found(message: str) -> ApiError:
    return ApiError(404, message)


def authentication_failed(message: str) -> ApiError:
    return ApiError(401, message)


def overloaded(message: str, retry_after: int | None = None) -> ApiError:
    headers = (("retry-after", str(retry_after)),) if retry_after is not None else ()
    return ApiError(529, message, headers=headers)
