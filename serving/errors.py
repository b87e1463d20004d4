"""Errors of the online service, each carrying the HTTP status it is answered with."""

from __future__ import annotations

from mlops.errors import PlatformError


class ServingError(PlatformError):
    """Base of the service's own errors; ``status`` is the HTTP status of the answer."""

    status = 500

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class Overloaded(ServingError):
    """More requests (or shadow copies) are in flight than the service accepts; shed, 503."""

    status = 503


class NotReady(ServingError):
    """The slot a request needs holds no model (nothing loaded yet): 503."""

    status = 503


class ModelTimeout(ServingError):
    """A model call did not finish within ``serving.request_timeout_seconds``: 504."""

    status = 504


class ModelFailed(ServingError):
    """ONNX Runtime raised while scoring validated input (a broken model, not the client): 500."""

    status = 500


class UnknownModel(ServingError):
    """A request names a model or version this service does not serve: 404."""

    status = 404


class Conflict(ServingError):
    """An admin change contradicts the current state (routes need an empty slot): 409."""

    status = 409


class BudgetExceeded(ServingError):
    """Loading another version would exceed the model memory budget with nothing evictable: 503."""

    status = 503


class UnusableModel(ServingError):
    """A registered version cannot be served: invalid ONNX, inputs that do not match the
    dataset schema, or no answer to its warm-up row. The service keeps what it had: 422."""

    status = 422


class UnknownRequest(ServingError):
    """Feedback names a request id this service never issued (mistyped, made up or forged): 422."""

    status = 422


class LabelConflict(ServingError):
    """Feedback gives a request another label than the first one it got (the first is kept): 409."""

    status = 409


class StateNotSaved(ServingError):
    """The new serving state could not be persisted; the service keeps serving the old one: 500."""

    status = 500


class FeaturesUnavailable(ServingError):
    """The online feature store cannot answer a lookup (unreachable, no checkpoint yet, or
    state built for other feature declarations): 503."""

    status = 503
