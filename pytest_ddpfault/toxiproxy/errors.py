"""The API's error answers, with Toxiproxy's messages and status codes."""

from __future__ import annotations

from typing import Callable

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


def _fixed(message: str, status: int) -> Callable[[], ApiError]:
    """A factory of one of Toxiproxy's fixed errors.

    Fresh instances each time: re-raising one shared exception object would keep growing
    its traceback.
    """

    def make() -> ApiError:
        return ApiError(message, status)

    make.__name__ = message.replace(" ", "_")
    return make


proxy_not_found = _fixed("proxy not found", 404)
proxy_already_exists = _fixed("proxy already exists", 409)
invalid_stream = _fixed("stream was invalid, can be either upstream or downstream", 400)
invalid_toxic_type = _fixed("invalid toxic type", 400)
toxic_already_exists = _fixed("toxic already exists", 409)
toxic_not_found = _fixed("toxic not found", 404)
