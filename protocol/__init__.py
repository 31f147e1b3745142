"""Tandem's wire: messages, tensor encoding, chunking, topics, errors, the transports (the
``Transport`` interface, MQTT and in-memory) and the bundle format. Imports no other package of
ours and nothing heavy (no onnx, no TensorRT).

The transports (asyncio; paho-mqtt for MQTT) and the bundle format (cryptography, zstandard on
use) load on first access of one of their names, so ``import tandem.protocol`` stays cheap for
every CLI start.
"""

from __future__ import annotations

import importlib as _importlib

from tandem.protocol.chunking import Reassembler, split
from tandem.protocol.codec import DEFAULT_LIMITS, Limits, MessageType, decode, encode
from tandem.protocol.errors import (
    Code,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    MalformedMessage,
    MissingDependency,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    ProtocolError,
    ResourceExhausted,
    TandemError,
    Unavailable,
    UnsupportedDType,
    UnsupportedVersion,
    error_from_wire,
)
from tandem.protocol.messages import (
    PROTOCOL_VERSION,
    Assignment,
    CloudLoad,
    DeviceStatus,
    ErrorInfo,
    InferenceRequest,
    InferenceResponse,
    Timings,
    new_request_id,
)
from tandem.protocol.tensors import DType, Encoding, Tensor

_LAZY = {
    "Transport": "tandem.protocol.transport",
    "SyncTransport": "tandem.protocol.transport",
    "MemoryBroker": "tandem.protocol.transport",
    "MemoryTransport": "tandem.protocol.transport",
    "MqttTransport": "tandem.protocol.mqtt",
    "TransportConfig": "tandem.protocol.transport",
    "TlsConfig": "tandem.protocol.transport",
    "Will": "tandem.protocol.transport",
    "IncomingMessage": "tandem.protocol.transport",
    "RequestContext": "tandem.protocol.transport",
    "PublishHandle": "tandem.protocol.transport",
    "TransportStats": "tandem.protocol.transport",
    "ServeStats": "tandem.protocol.transport",
    "Bundle": "tandem.protocol.bundle",
    "BundleWriter": "tandem.protocol.bundle",
    "Manifest": "tandem.protocol.bundle",
    "load_bundle": "tandem.protocol.bundle",
    "open_bundle": "tandem.protocol.bundle",
    "BundleError": "tandem.protocol.bundle",
    "BundleIntegrityError": "tandem.protocol.bundle",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tandem.protocol' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_LIMITS",
    "PROTOCOL_VERSION",
    "Assignment",
    "Bundle",
    "BundleError",
    "BundleIntegrityError",
    "BundleWriter",
    "CloudLoad",
    "Code",
    "DType",
    "DeadlineExceeded",
    "DeviceStatus",
    "Encoding",
    "ErrorInfo",
    "FailedPrecondition",
    "IncomingMessage",
    "InferenceRequest",
    "InferenceResponse",
    "InternalError",
    "InvalidArgument",
    "Limits",
    "MalformedMessage",
    "Manifest",
    "MemoryBroker",
    "MemoryTransport",
    "MessageType",
    "MissingDependency",
    "MqttTransport",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProtocolError",
    "PublishHandle",
    "Reassembler",
    "RequestContext",
    "ResourceExhausted",
    "ServeStats",
    "SyncTransport",
    "TandemError",
    "Tensor",
    "Timings",
    "TlsConfig",
    "Transport",
    "TransportConfig",
    "TransportStats",
    "Unavailable",
    "UnsupportedDType",
    "UnsupportedVersion",
    "Will",
    "decode",
    "encode",
    "error_from_wire",
    "load_bundle",
    "new_request_id",
    "open_bundle",
    "split",
]
