"""Errors a request can meet on its way to the runtime, with their HTTP status."""

from __future__ import annotations


class ServingError(Exception):
    """Refusal of one request; the agent keeps serving. `code` is stable."""

    code = "error"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequestError(ServingError):
    code = "request.malformed"
    status = 400


class InputMismatchError(ServingError):
    code = "input.mismatch"
    status = 400


class TooLargeError(ServingError):
    code = "request.too_large"
    status = 413


class ModelNotFoundError(ServingError):
    code = "model.not_found"
    status = 404


class NotReadyError(ServingError):
    code = "model.not_ready"
    status = 503


class OverloadedError(ServingError):
    code = "overloaded"
    status = 503


class RuntimeFailureError(ServingError):
    code = "runtime.failed"
    status = 500
