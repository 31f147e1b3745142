"""The one exception root of Tandem, with codes mirrored on the wire.

Every error Tandem raises on purpose is a :class:`TandemError`. Its ``code`` is the same number
that travels in a response's ``error`` field, so an error raised in a cloud worker arrives on the
device as the same class (see :func:`error_from_wire`).

Tree (by code; domain errors subclass the code they carry)::

    TandemError                      code                retryable
    ├── InvalidArgument              INVALID_ARGUMENT    no
    │   ├── UnsupportedDType         an element type or encoding Tandem cannot carry
    │   └── MalformedMessage         (also a ProtocolError)
    ├── NotFound                     NOT_FOUND           no
    ├── FailedPrecondition           FAILED_PRECONDITION no
    │   └── MissingDependency        an install extra is missing
    ├── DeadlineExceeded             DEADLINE_EXCEEDED   yes
    ├── ResourceExhausted            RESOURCE_EXHAUSTED  yes
    ├── Unavailable                  UNAVAILABLE         yes
    ├── PermissionDenied             PERMISSION_DENIED   no
    ├── InternalError                INTERNAL            no   (a bug in Tandem, nothing else)
    ├── UnknownError                 UNKNOWN             no   (a peer sent a code we do not know)
    ├── HandlerFailed                HANDLER_FAILED      no   (an application's handler raised)
    └── ProtocolError                a message (or bundle) the protocol cannot take
        ├── PayloadTooLarge          PAYLOAD_TOO_LARGE   no
        ├── UnsupportedVersion       UNSUPPORTED_VERSION no
        └── MalformedMessage         INVALID_ARGUMENT    no   (see above)

    ``except ProtocolError`` catches everything the wire decoder raises (malformed, too large,
    another version); ``.code`` says which kind.

Foreign exceptions (paho, ONNX Runtime, TensorRT, sqlite, OS) are translated into this tree at
one boundary per library and chained with ``raise ... from exc``.
"""

from __future__ import annotations

import enum

__all__ = [
    "Code",
    "DeadlineExceeded",
    "FailedPrecondition",
    "HandlerFailed",
    "InternalError",
    "InvalidArgument",
    "MalformedMessage",
    "MissingDependency",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProtocolError",
    "ResourceExhausted",
    "TandemError",
    "Unavailable",
    "UnknownError",
    "UnsupportedDType",
    "UnsupportedVersion",
    "error_class",
    "error_from_wire",
]


class Code(enum.IntEnum):
    """Error codes on the wire. Numbers never change meaning; new codes get new numbers."""

    INVALID_ARGUMENT = 1
    NOT_FOUND = 2
    FAILED_PRECONDITION = 3
    DEADLINE_EXCEEDED = 4
    RESOURCE_EXHAUSTED = 5
    UNAVAILABLE = 6
    PAYLOAD_TOO_LARGE = 7
    UNSUPPORTED_VERSION = 8
    PERMISSION_DENIED = 9
    INTERNAL = 10
    UNKNOWN = 11
    HANDLER_FAILED = 12


class TandemError(Exception):
    """Root of every error Tandem raises on purpose."""

    code: Code = Code.INTERNAL
    retryable: bool = False

    def __init__(self, message: str = "", *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code.name})"

    def __reduce__(self):  # keep the retryable override when pickled across processes
        return (_rebuild, (type(self), self.message, self.retryable))


def _rebuild(cls: type[TandemError], message: str, retryable: bool) -> TandemError:
    return cls(message, retryable=retryable)


class InvalidArgument(TandemError):
    code = Code.INVALID_ARGUMENT


class UnsupportedDType(InvalidArgument):
    """An element type (or encoding) that Tandem does not know, or that cannot travel on the
    wire (``tandem.protocol.dtypes.wire_dtype_for``); the message names it."""


class NotFound(TandemError):
    code = Code.NOT_FOUND


class FailedPrecondition(TandemError):
    code = Code.FAILED_PRECONDITION


class DeadlineExceeded(TandemError):
    code = Code.DEADLINE_EXCEEDED
    retryable = True


class ResourceExhausted(TandemError):
    code = Code.RESOURCE_EXHAUSTED
    retryable = True


class Unavailable(TandemError):
    code = Code.UNAVAILABLE
    retryable = True


class PermissionDenied(TandemError):
    code = Code.PERMISSION_DENIED


class InternalError(TandemError):
    """A bug in Tandem, not a mistake by the user (and nothing else: a peer's unknown code is
    :class:`UnknownError`, an application handler's exception :class:`HandlerFailed`)."""

    code = Code.INTERNAL


class UnknownError(TandemError):
    """A peer reported an error code this version of Tandem does not know."""

    code = Code.UNKNOWN


class HandlerFailed(TandemError):
    """The application's request handler raised something that is not a :class:`TandemError`:
    a failure of the code being served, not of Tandem."""

    code = Code.HANDLER_FAILED


class MissingDependency(FailedPrecondition):
    """An optional library is not installed; the message names the install extra."""


class ProtocolError(TandemError):
    """Root of what a message or bundle that the protocol cannot take raises: everything the
    wire decoder raises is one (never raised by itself)."""


class PayloadTooLarge(ProtocolError):
    """A message, tensor or file over a limit (a decoder limit, the broker's packet size...)."""

    code = Code.PAYLOAD_TOO_LARGE


class UnsupportedVersion(ProtocolError):
    """Another major version of the wire protocol, or a bundle schema this version cannot read."""

    code = Code.UNSUPPORTED_VERSION


class MalformedMessage(ProtocolError, InvalidArgument):
    code = Code.INVALID_ARGUMENT


_BY_CODE: dict[Code, type[TandemError]] = {
    Code.INVALID_ARGUMENT: InvalidArgument,
    Code.NOT_FOUND: NotFound,
    Code.FAILED_PRECONDITION: FailedPrecondition,
    Code.DEADLINE_EXCEEDED: DeadlineExceeded,
    Code.RESOURCE_EXHAUSTED: ResourceExhausted,
    Code.UNAVAILABLE: Unavailable,
    Code.PAYLOAD_TOO_LARGE: PayloadTooLarge,
    Code.UNSUPPORTED_VERSION: UnsupportedVersion,
    Code.PERMISSION_DENIED: PermissionDenied,
    Code.INTERNAL: InternalError,
    Code.UNKNOWN: UnknownError,
    Code.HANDLER_FAILED: HandlerFailed,
}


def error_class(code: Code | int) -> type[TandemError]:
    """The exception class for a wire code; codes this version does not know map to
    :class:`UnknownError`."""
    try:
        return _BY_CODE[Code(code)]
    except ValueError:
        return UnknownError


def error_from_wire(code: int, message: str, retryable: bool) -> TandemError:
    """Rebuild the exception a peer reported in a response's ``error`` field."""
    cls = error_class(code)
    if code not in Code._value2member_map_:
        message = f"[unknown error code {code}] {message}"
    return cls(message, retryable=retryable)
