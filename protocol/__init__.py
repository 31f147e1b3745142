"""Tandem's wire: messages, tensor encoding, chunking, topics, errors, the MQTT transport and
the bundle format. Imports no other package of ours and nothing heavy (no onnx, no TensorRT)."""

from protocol.errors import (
    Code,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    MissingDependency,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    ProtocolError,
    ResourceExhausted,
    TandemError,
    Unavailable,
    UnsupportedVersion,
)

__all__ = [
    "Code",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InternalError",
    "InvalidArgument",
    "MissingDependency",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProtocolError",
    "ResourceExhausted",
    "TandemError",
    "Unavailable",
    "UnsupportedVersion",
]
