"""Typed, immutable messages of the split-execution protocol v1.

These classes are the contract between the edge daemon, the cloud endpoint and the fleet tools.
They hold plain Python values and :class:`~tandem.protocol.tensors.Tensor` objects; only
``tandem.protocol._codec`` turns them into bytes and back (see ``protocol/SPEC.md``).

Schema evolution: a new field is appended with a default; a field's meaning never changes;
``version`` is the protocol version that wrote the message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tandem.protocol.errors import Code
from tandem.protocol.tensors import Tensor

__all__ = [
    "PROTOCOL_VERSION",
    "Assignment",
    "CloudLoad",
    "DeviceStatus",
    "ErrorInfo",
    "InferenceRequest",
    "InferenceResponse",
    "Message",
    "Timings",
    "new_request_id",
]

PROTOCOL_VERSION = 1


def new_request_id() -> bytes:
    """A fresh 128-bit request id."""
    return os.urandom(16)


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """Run part of a model: the tail after ``cut_id`` (0 = the whole model from the raw input)."""

    id: bytes  # 16 bytes, idempotency key and correlation id
    device_id: str
    model_digest: str  # hex sha256 of the source model, as in the bundle manifest
    cut_id: int
    budget_ms: int  # time left for the cloud to answer; also the MQTT 5 message expiry
    tensors: tuple[Tensor, ...]
    priority: int = 0  # higher first; 0 = normal
    reply_topic: str = ""
    sent_at_ms: int = 0  # sender wall clock (ms since epoch), for age accounting
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An error as a value on the wire. ``code`` is a plain int when a newer peer sent a code this
    version does not know (codes never change meaning; see protocol.errors.error_from_wire)."""

    code: Code | int
    message: str
    retryable: bool = False


@dataclass(frozen=True, slots=True)
class Timings:
    queue_ms: float = 0.0
    compute_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class InferenceResponse:
    """Outputs of a request, or its error (exactly one of the two is meaningful)."""

    id: bytes
    outputs: tuple[Tensor, ...] = ()
    error: ErrorInfo | None = None
    timings: Timings = field(default_factory=Timings)
    worker_id: str = ""
    queue_depth: int = 0  # requests waiting at the answering worker when this one finished
    version: int = PROTOCOL_VERSION

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """Heartbeat of a device (retained on ``tandem/v1/status/<device>``; last will = offline)."""

    device_id: str
    state: str  # "online" | "offline" | "degraded"
    timestamp_ms: int
    bundle_digest: str = ""
    uplink_bps: float = 0.0
    rtt_ms: float = 0.0
    queue_depth: int = 0
    # request statistics over the daemon's last reporting window (added with the fleet tools;
    # absent from older senders, which decode as zeros)
    p50_ms: float = 0.0  # median end-to-end latency
    p99_ms: float = 0.0
    fallbacks: int = 0  # requests finished locally after an offload failed or timed out
    plan_mix: tuple[tuple[str, int], ...] = ()  # (plan label, requests), e.g. ("cut 3", 41)
    # the last assignment the device refused (it failed verification or would not load): its
    # bundle digest and why; "" when the last rollout did not end in a refusal
    refused_digest: str = ""
    refused_reason: str = ""
    # cascades (issue #17): share of the window's cascade requests the escalation rule sent to
    # the large model (0 also when none ran; plan_mix then has no "small"/"escalate:" plans)
    escalation_ratio: float = 0.0
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class CloudLoad:
    """Load report of a cloud worker (retained on ``tandem/v1/cloud/<worker>/load``)."""

    worker_id: str
    timestamp_ms: int
    queue_depth: int = 0
    inflight: int = 0
    queue_ms: float = 0.0  # expected wait before a new request starts
    # measured tail latency per (model digest, cut id) → ms, for the edge planners
    tail_ms: tuple[tuple[str, int, float], ...] = ()
    state: str = "online"  # "online" | "draining" | "offline" (the last will)
    # mean batch size per (model digest, cut id), same layout as tail_ms
    batch_size: tuple[tuple[str, int, float], ...] = ()
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Assignment:
    """Which bundle a device should run (retained on ``tandem/v1/assign/<device>``).

    ``bundle_digest`` is the sha256 of the bundle's manifest.json (it names the whole bundle);
    ``bundle_uri`` and then ``mirror_uris`` are where its archive can be fetched (HTTP(S), with
    range requests for resuming); ``archive_sha256`` and ``archive_size`` describe the archive
    file itself, checked before it is unpacked; ``signature`` is the raw 64-byte ed25519
    signature over manifest.json (the content of manifest.sig, decoded), to be verified with the
    fleet's bundle-signing public key. The fields after ``issued_at_ms`` were added with the
    fleet tools; older senders leave them empty."""

    device_id: str
    model_name: str
    bundle_digest: str
    bundle_uri: str = ""
    issued_at_ms: int = 0
    model_version: str = ""
    archive_sha256: str = ""
    archive_size: int = 0
    signature: bytes = b""
    mirror_uris: tuple[str, ...] = ()
    version: int = PROTOCOL_VERSION


Message = InferenceRequest | InferenceResponse | DeviceStatus | CloudLoad | Assignment
