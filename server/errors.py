"""The two exceptions serving raises: an error for the client (OpenAI's format) and stopped work."""

from __future__ import annotations


class ApiError(Exception):
    """An error returned to the client in OpenAI's format (`protocol.ErrorResponse`)."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code=None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.code = code if code is not None else status
        self.headers = headers or {}

    def body(self) -> dict:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


class Cancelled(Exception):
    """Work stopped because its client went away or its time ran out."""


def invalid(message: str, param: str | None = None, status: int = 422, code=None) -> ApiError:
    """The common case: a request the client can fix."""
    return ApiError(status, message, "invalid_request_error", param, code)
