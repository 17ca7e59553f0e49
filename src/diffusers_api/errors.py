"""The error tree. Every error a user can cause or meet knows its wire code and HTTP status.

    DiffusersAPIError                 APP_INFERENCE_ERROR  500
    ├── InvalidInputs                 INVALID_INPUTS       422
    │   ├── InvalidImage              INVALID_INPUTS       422  (names the field)
    │   └── InvalidScheduler          INVALID_SCHEDULER    422  (+ available)
    ├── PayloadTooLarge               PAYLOAD_TOO_LARGE    413
    ├── Unauthorized                  UNAUTHORIZED         401
    ├── NoModelId                     NO_MODEL_ID          422
    ├── ModelNotFound                 MODEL_NOT_FOUND      404
    ├── ModelMismatch                 MODEL_MISMATCH       404  (+ requested, available)
    ├── NoSuchPipeline                NO_SUCH_PIPELINE     404  (+ requested, available)
    ├── NoSuchJob                     NO_SUCH_JOB          404  (unknown, or finished and forgotten)
    ├── NotFound                      NOT_FOUND            404  (no such route)
    ├── MethodNotAllowed              METHOD_NOT_ALLOWED   405  (+ allowed)
    ├── NotReady                      NOT_READY            503
    ├── Busy                          BUSY                 503
    ├── Cancelled                     CANCELLED            409
    ├── ModelLoadError                MODEL_LOAD_ERROR     500
    ├── StorageError                  STORAGE_ERROR        502  (a download or upload failed: S3, HTTP, hub)
    └── PipelineError                 PIPELINE_ERROR       500

The codes of docker-diffusers-api are kept (INVALID_INPUTS, NO_MODEL_ID, MODEL_MISMATCH, NO_SUCH_PIPELINE,
INVALID_SCHEDULER, PIPELINE_ERROR, APP_INFERENCE_ERROR) with their extra fields; unlike the original, the HTTP
status is meaningful. `to_wire` is the one place an error becomes JSON; the transports only wrap it. As in the
original, the JSON has `name`, the Python exception behind the error (with DEBUG, also its `stack`).
"""

from __future__ import annotations

import traceback
from typing import Any


class DiffusersAPIError(Exception):
    """Base of every error that reaches a client. Subclasses set `code` and `status`."""

    code = "APP_INFERENCE_ERROR"
    status = 500

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    @property
    def name(self) -> str:
        """What failed, as the original server named it (`type(err).__name__`): the exception this error was
        raised from when that is not one of ours (a pipeline's RuntimeError, ...), else this error's class."""
        cause = self.__cause__
        if cause is not None and not isinstance(cause, DiffusersAPIError):
            return type(cause).__name__
        return type(self).__name__

    def to_wire(self, debug: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "name": self.name, "message": self.message, **self.extra}
        if debug and self.__traceback__ is not None:
            body["stack"] = "".join(traceback.format_exception(self))
        return body


class InvalidInputs(DiffusersAPIError):
    code = "INVALID_INPUTS"
    status = 422


class InvalidImage(InvalidInputs):
    """An image input that is not a decodable image, or too large. `field` names the input."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}", field=field)


class InvalidScheduler(InvalidInputs):
    code = "INVALID_SCHEDULER"


class PayloadTooLarge(DiffusersAPIError):
    code = "PAYLOAD_TOO_LARGE"
    status = 413


class Unauthorized(DiffusersAPIError):
    code = "UNAUTHORIZED"
    status = 401


class NoModelId(DiffusersAPIError):
    code = "NO_MODEL_ID"
    status = 422


class ModelNotFound(DiffusersAPIError):
    code = "MODEL_NOT_FOUND"
    status = 404


class ModelMismatch(DiffusersAPIError):
    code = "MODEL_MISMATCH"
    status = 404


class NoSuchPipeline(DiffusersAPIError):
    code = "NO_SUCH_PIPELINE"
    status = 404


class NoSuchJob(DiffusersAPIError):
    code = "NO_SUCH_JOB"
    status = 404


class NotFound(DiffusersAPIError):
    """A path the server has no route for."""

    code = "NOT_FOUND"
    status = 404


class MethodNotAllowed(DiffusersAPIError):
    """A route that exists, asked with a method it does not take; `allowed` lists those it does."""

    code = "METHOD_NOT_ALLOWED"
    status = 405


class NotReady(DiffusersAPIError):
    code = "NOT_READY"
    status = 503


class Busy(DiffusersAPIError):
    code = "BUSY"
    status = 503


class Cancelled(DiffusersAPIError):
    code = "CANCELLED"
    status = 409


class ModelLoadError(DiffusersAPIError):
    code = "MODEL_LOAD_ERROR"
    status = 500


class StorageError(DiffusersAPIError):
    """A model download or upload failed (S3 endpoint down, HTTP error, corrupt archive). 502: the server is
    fine, what it fetches from is not."""

    code = "STORAGE_ERROR"
    status = 502


class PipelineError(DiffusersAPIError):
    code = "PIPELINE_ERROR"
    status = 500


def from_exception(exc: BaseException) -> DiffusersAPIError:
    """Wrap anything unexpected so that it reaches the client as APP_INFERENCE_ERROR, never as a crash."""
    if isinstance(exc, DiffusersAPIError):
        return exc
    wrapped = DiffusersAPIError(f"{type(exc).__name__}: {exc}")
    wrapped.__cause__, wrapped.__traceback__ = exc, exc.__traceback__
    return wrapped
