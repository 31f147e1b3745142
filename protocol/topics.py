"""MQTT topics of the split-execution protocol v1 (DESIGN.md, "The split-execution protocol").

    tandem/v1/req/<device>/<model>      requests (cloud workers subscribe with a shared group)
    tandem/v1/resp/<device>             replies
    tandem/v1/status/<device>           device status (retained; last will = offline)
    tandem/v1/cloud/<worker>/load       cloud load (retained)
    tandem/v1/assign/<device>           assignments (retained)

Every id that becomes a topic level goes through :func:`validate_id`: it must be a non-empty
UTF-8 string of at most :data:`MAX_ID_LEN` bytes without ``/``, ``+``, ``#``, NUL or other
control characters, and must not start with ``$`` (broker-reserved topics).
"""

from __future__ import annotations

from tandem.protocol.errors import InvalidArgument

__all__ = [
    "MAX_ID_LEN",
    "PREFIX",
    "assign_topic",
    "load_topic",
    "parse_assign_topic",
    "parse_load_topic",
    "parse_request_topic",
    "parse_response_topic",
    "parse_status_topic",
    "request_filter",
    "request_topic",
    "response_topic",
    "status_topic",
    "validate_id",
]

PREFIX = "tandem/v1"
MAX_ID_LEN = 128  # bytes of UTF-8
_FORBIDDEN = frozenset("/+#\x7f") | frozenset(chr(c) for c in range(0x20))


def validate_id(s: str | bytes, what: str = "id") -> str:
    """``s`` as a str if it is usable as one topic level; InvalidArgument naming ``what`` if not."""
    if isinstance(s, (bytes, bytearray)):
        try:
            s = bytes(s).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"{what} is not valid UTF-8") from exc
    if not isinstance(s, str):
        raise InvalidArgument(f"{what} must be a str, not {type(s).__name__}")
    if not s:
        raise InvalidArgument(f"{what} must not be empty")
    try:
        n = len(s.encode("utf-8"))
    except UnicodeEncodeError as exc:  # lone surrogates
        raise InvalidArgument(f"{what} is not valid UTF-8: {s!r}") from exc
    if n > MAX_ID_LEN:
        raise InvalidArgument(f"{what} is {n} bytes long (at most {MAX_ID_LEN})")
    if s[0] == "$":
        raise InvalidArgument(f"{what} must not start with '$': {s!r}")
    bad = _FORBIDDEN.intersection(s)
    if bad:
        raise InvalidArgument(f"{what} contains forbidden characters {sorted(bad)!r}: {s!r}")
    return s


def request_topic(device_id: str, model: str) -> str:
    return f"{PREFIX}/req/{validate_id(device_id, 'device_id')}/{validate_id(model, 'model')}"


def request_filter(shared_group: str | None = None) -> str:
    """The cloud workers' subscription: ``$share/<group>/tandem/v1/req/+/+`` (or unshared)."""
    flt = f"{PREFIX}/req/+/+"
    if shared_group is None:
        return flt
    return f"$share/{validate_id(shared_group, 'shared_group')}/{flt}"


def response_topic(device_id: str) -> str:
    return f"{PREFIX}/resp/{validate_id(device_id, 'device_id')}"


def status_topic(device_id: str) -> str:
    return f"{PREFIX}/status/{validate_id(device_id, 'device_id')}"


def load_topic(worker_id: str) -> str:
    return f"{PREFIX}/cloud/{validate_id(worker_id, 'worker_id')}/load"


def assign_topic(device_id: str) -> str:
    return f"{PREFIX}/assign/{validate_id(device_id, 'device_id')}"


def _levels(topic: str | bytes, kind: str, n: int, what: str) -> list[str]:
    if isinstance(topic, (bytes, bytearray)):
        try:
            topic = bytes(topic).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"{what} topic is not valid UTF-8") from exc
    if not isinstance(topic, str):
        raise InvalidArgument(f"topic must be a str, not {type(topic).__name__}")
    levels = topic.split("/")
    if len(levels) != n or "/".join(levels[:3]) != f"{PREFIX}/{kind}":
        raise InvalidArgument(f"not a {what} topic: {topic!r}")
    return levels


def parse_request_topic(topic: str | bytes) -> tuple[str, str]:
    """``(device_id, model)`` of ``tandem/v1/req/<device>/<model>``; InvalidArgument otherwise."""
    levels = _levels(topic, "req", 5, "request")
    return validate_id(levels[3], "device_id"), validate_id(levels[4], "model")


def parse_response_topic(topic: str | bytes) -> str:
    """The device id of ``tandem/v1/resp/<device>``."""
    return validate_id(_levels(topic, "resp", 4, "response")[3], "device_id")


def parse_status_topic(topic: str | bytes) -> str:
    """The device id of ``tandem/v1/status/<device>``."""
    return validate_id(_levels(topic, "status", 4, "status")[3], "device_id")


def parse_load_topic(topic: str | bytes) -> str:
    """The worker id of ``tandem/v1/cloud/<worker>/load``."""
    levels = _levels(topic, "cloud", 5, "load")
    if levels[4] != "load":
        raise InvalidArgument(f"not a load topic: {topic!r}")
    return validate_id(levels[3], "worker_id")


def parse_assign_topic(topic: str | bytes) -> str:
    """The device id of ``tandem/v1/assign/<device>``."""
    return validate_id(_levels(topic, "assign", 4, "assignment")[3], "device_id")
