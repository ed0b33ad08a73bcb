"""Exceptions of the Tensorfleet Python client.

Every error the coordinator reports arrives as the wire `Error {code, message}` and is raised as
the subclass of `TensorfleetError` for its code, carrying the coordinator's message unchanged.
Errors found on this side (timeouts, a lost connection, a malformed reply) use the same classes.
"""

from ._generated import job_generated as _wire


class TensorfleetError(Exception):
    """Base class. `code` is the wire ErrorCode name, `message` the coordinator's text."""

    code = "Internal"

    def __init__(self, message, request=None):
        super().__init__(message)
        self.message = message
        self.request = request  # the request kind that failed ("Forward", "LoadModel", ...)

    def __str__(self):
        return self.message


class InvalidArgumentError(TensorfleetError, ValueError):
    """A bad allocation string, an unknown device, a tensor of the wrong shape or dtype."""

    code = "InvalidArgument"


class NotFoundError(TensorfleetError, LookupError):
    """An unknown model name or a model file outside the coordinator's model roots."""

    code = "NotFound"


class AlreadyExistsError(TensorfleetError):
    code = "AlreadyExists"


class OutOfRangeError(TensorfleetError):
    code = "OutOfRange"


class ResourceExhaustedError(TensorfleetError):
    """The plan does not fit the devices' capacities, or the job queue is full."""

    code = "ResourceExhausted"


class FailedPreconditionError(TensorfleetError):
    """The request is valid but the coordinator is not in a state to run it (e.g. a run cache
    miss, a model that is still loading)."""

    code = "FailedPrecondition"


class UnavailableError(TensorfleetError, ConnectionError):
    """The coordinator cannot be reached, or the connection was lost."""

    code = "Unavailable"


class DeadlineExceededError(TensorfleetError, TimeoutError):
    """No reply within the call's timeout."""

    code = "DeadlineExceeded"


class DataLossError(TensorfleetError):
    code = "DataLoss"


class CancelledError(TensorfleetError):
    """The request was cancelled (the caller asked for it)."""

    code = "Cancelled"


class UnimplementedError(TensorfleetError, NotImplementedError):
    code = "Unimplemented"


class InternalError(TensorfleetError):
    code = "Internal"


class ProtocolError(TensorfleetError):
    """The coordinator's reply does not follow the protocol (docs/protocol.md)."""

    code = "Internal"


class VersionMismatchError(FailedPreconditionError):
    """The coordinator speaks another protocol major version."""


_BY_CODE = {
    _wire.ErrorCode.InvalidArgument: InvalidArgumentError,
    _wire.ErrorCode.NotFound: NotFoundError,
    _wire.ErrorCode.AlreadyExists: AlreadyExistsError,
    _wire.ErrorCode.OutOfRange: OutOfRangeError,
    _wire.ErrorCode.ResourceExhausted: ResourceExhaustedError,
    _wire.ErrorCode.FailedPrecondition: FailedPreconditionError,
    _wire.ErrorCode.Unavailable: UnavailableError,
    _wire.ErrorCode.DeadlineExceeded: DeadlineExceededError,
    _wire.ErrorCode.DataLoss: DataLossError,
    _wire.ErrorCode.Cancelled: CancelledError,
    _wire.ErrorCode.Unimplemented: UnimplementedError,
    _wire.ErrorCode.Internal: InternalError,
}


def error_from_wire(code, message, request=None):
    """Returns the exception for a wire Error {code, message}."""
    cls = _BY_CODE.get(code)
    if cls is None:
        # Ok (0) or a code newer than this client: still an error, say which code it was.
        return InternalError("coordinator error (code %d): %s" % (code, message), request)
    return cls(message, request)
