"""Encode and decode protocol messages (the byte layout is in ``protocol/SPEC.md``).

    frame = encode(msg)                       # bytes: msgpack envelope + aligned tensor payloads
    parts, n = encode_parts(msg)              # the same frame as pieces (views of the tensors)
    msg = decode(frame, limits=DEFAULT_LIMITS)  # strict; raises only ProtocolError subclasses
    info = peek(frame)                        # type, id, declared tensor bytes: envelope only
    opened = open_frame(frame)                # peek + decode, the envelope parsed once:
    opened.info; msg = opened.decode()        #   what a receiver that budgets first uses

Schema evolution: a newer v1 peer may add map keys; this decoder ignores keys it does not know,
and fills fields a peer did not send from their defaults. A different protocol major version is
a :class:`~tandem.protocol.errors.UnsupportedVersion`.
"""

from tandem.protocol._codec import (
    DEFAULT_LIMITS,
    Compression,
    FrameInfo,
    Limits,
    MessageType,
    OpenFrame,
    decode,
    encode,
    encode_parts,
    open_frame,
    peek,
)

__all__ = [
    "DEFAULT_LIMITS",
    "Compression",
    "FrameInfo",
    "Limits",
    "MessageType",
    "OpenFrame",
    "decode",
    "encode",
    "encode_parts",
    "open_frame",
    "peek",
]
