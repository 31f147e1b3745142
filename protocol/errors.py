"""The one exception root of Tandem, with codes mirrored on the wire.

Every error Tandem raises on purpose is a :class:`TandemError`. Its ``code`` is the same number
that travels in a response's ``error`` field, so an error raised in a cloud worker arrives on the
device as the same class (see :func:`error_from_wire`).

Tree (by code; domain errors subclass the code they carry)::

    TandemError                      code            retryable
    ├── InvalidArgument              INVALID_ARGUMENT    no
    │   └── MalformedMessage  (also ProtocolError)
    ├── NotFound                     NOT_FOUND           no
    ├── FailedPrecondition           FAILED_PRECONDITION no
    │   └── MissingDependency        an install extra is missing
    ├── DeadlineExceeded             DEADLINE_EXCEEDED   yes
    ├── ResourceExhausted            RESOURCE_EXHAUSTED  yes
    ├── Unavailable                  UNAVAILABLE         yes
    ├── PayloadTooLarge              PAYLOAD_TOO_LARGE   no
    │   └── MessageTooLarge   (also ProtocolError)
    ├── UnsupportedVersion           UNSUPPORTED_VERSION no
    │   └── VersionMismatch   (also ProtocolError)
    ├── PermissionDenied             PERMISSION_DENIED   no
    └── InternalError                INTERNAL            no   (our bug, not the user's)

    ProtocolError: mixin base of every error the wire decoder raises; ``except ProtocolError``
    catches all of them and ``.code`` says which kind.

Foreign exceptions (paho, ONNX Runtime, TensorRT, sqlite, OS) are translated into this tree at
one boundary per library and chained with ``raise ... from exc``.
"""

from __future__ import annotations

import enum

__all__ = [
    "Code",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InternalError",
    "InvalidArgument",
    "MalformedMessage",
    "MessageTooLarge",
    "MissingDependency",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProtocolError",
    "ResourceExhausted",
    "TandemError",
    "Unavailable",
    "UnsupportedVersion",
    "VersionMismatch",
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


class PayloadTooLarge(TandemError):
    code = Code.PAYLOAD_TOO_LARGE


class UnsupportedVersion(TandemError):
    code = Code.UNSUPPORTED_VERSION


class PermissionDenied(TandemError):
    code = Code.PERMISSION_DENIED


class InternalError(TandemError):
    """A bug in Tandem, not a mistake by the user."""

    code = Code.INTERNAL


class MissingDependency(FailedPrecondition):
    """An optional library is not installed; the message names the install extra."""


class ProtocolError(TandemError):
    """Mixin root of everything the wire decoder raises (never raised by itself)."""


class MalformedMessage(ProtocolError, InvalidArgument):
    code = Code.INVALID_ARGUMENT


class MessageTooLarge(ProtocolError, PayloadTooLarge):
    code = Code.PAYLOAD_TOO_LARGE


class VersionMismatch(ProtocolError, UnsupportedVersion):
    code = Code.UNSUPPORTED_VERSION


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
}


def error_class(code: Code | int) -> type[TandemError]:
    """The exception class for a wire code; unknown codes map to :class:`InternalError`."""
    try:
        return _BY_CODE[Code(code)]
    except ValueError:
        return InternalError


def error_from_wire(code: int, message: str, retryable: bool) -> TandemError:
    """Rebuild the exception a peer reported in a response's ``error`` field."""
    cls = error_class(code)
    if cls is InternalError and code not in Code._value2member_map_:
        message = f"[unknown error code {code}] {message}"
    return cls(message, retryable=retryable)
