"""The API's error answers, with Toxiproxy's messages and status codes."""

from __future__ import annotations

__all__ = [
    "ApiError",
    "bad_request_body",
    "missing_field",
    "proxy_not_found",
    "proxy_already_exists",
    "invalid_stream",
    "invalid_toxic_type",
    "toxic_already_exists",
    "toxic_not_found",
]


class ApiError(Exception):
    """An error the API answers with ``{"error": message, "status": status}``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def as_json(self) -> dict:
        return {"error": self.message, "status": self.status}

    def __repr__(self) -> str:
        return f"ApiError({self.message!r}, {self.status})"


def bad_request_body(detail: object) -> ApiError:
    return ApiError(f"bad request body: {detail}", 400)


def missing_field(detail: str) -> ApiError:
    return ApiError(f"missing required field: {detail}", 400)


# Fresh instances each time: re-raising one shared exception object would keep
# growing its traceback.
def proxy_not_found() -> ApiError:
    return ApiError("proxy not found", 404)


def proxy_already_exists() -> ApiError:
    return ApiError("proxy already exists", 409)


def invalid_stream() -> ApiError:
    return ApiError("stream was invalid, can be either upstream or downstream", 400)


def invalid_toxic_type() -> ApiError:
    return ApiError("invalid toxic type", 400)


def toxic_already_exists() -> ApiError:
    return ApiError("toxic already exists", 409)


def toxic_not_found() -> ApiError:
    return ApiError("toxic not found", 404)
