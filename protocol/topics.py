"""MQTT topics of the split-execution protocol v1 (SPEC.md §8, "Topics").

    tandem/v1/req/<device>/<model>      requests (cloud workers subscribe with a shared group)
    tandem/v1/resp/<device>             replies
    tandem/v1/status/<device>           device status (retained; last will = offline)
    tandem/v1/cloud/<worker>/load       cloud load (retained)
    tandem/v1/assign/<device>           assignments (retained)
    tandem/v1/req/_probe/_probe         a worker's shared-subscription probe (not a request)

Every id that becomes a topic level goes through :func:`validate_id`, and every topic built here
is made only of validated ids. An id must be what MQTT brokers accept in a topic (UTF-8 as MQTT 5
§1.5.4 defines it: well formed, no U+0000, no control character U+0001–U+001F or U+007F–U+009F,
no noncharacter U+FDD0–U+FDEF or U+xFFFE/U+xFFFF on any plane — mosquitto calls a packet holding
one malformed and drops the connection), plus our own rules: non-empty, at most
:data:`MAX_ID_LEN` bytes, no ``/``, ``+`` or ``#``, not starting with ``$`` (broker-reserved
topics). :func:`validate_topic` applies the same character rules to a whole topic name (a
configured or received reply topic, for example).
"""

from __future__ import annotations

import re

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
    "probe_topic",
    "refused_character",
    "request_filter",
    "request_topic",
    "response_topic",
    "status_topic",
    "validate_id",
]

PREFIX = "tandem/v1"
MAX_ID_LEN = 128  # bytes of UTF-8
# Characters MQTT 5 §1.5.4 lets a receiver refuse (mosquitto does): controls and noncharacters.
# Lone surrogates (U+D800..U+DFFF) cannot be encoded as UTF-8 at all and are refused before.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ufdd0-\ufdef\ufffe\uffff"
                     + "".join(f"{chr(p << 16 | 0xFFFE)}{chr(p << 16 | 0xFFFF)}"
                               for p in range(1, 17))
                     + "]")
_WILDCARDS = re.compile("[+#]")


def refused_character(s: str) -> str | None:
    """The first character of ``s`` that MQTT brokers refuse in a topic (a control character or
    a noncharacter, MQTT 5 §1.5.4), or None."""
    bad = _UNSAFE.search(s)
    return None if bad is None else bad.group()


def validate_id(s: str | bytes, what: str = "id") -> str:
    """``s`` as a str if it is usable as one topic level; InvalidArgument naming ``what`` if not
    (rules in the module docstring)."""
    if isinstance(s, (bytes, bytearray, memoryview)):
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
    bad = refused_character(s)
    if bad is not None:
        raise InvalidArgument(
            f"{what} contains U+{ord(bad):04X}, a control character or noncharacter that MQTT "
            f"brokers refuse in topics: {s!r}")
    if n > MAX_ID_LEN:
        raise InvalidArgument(f"{what} is {n} bytes long (at most {MAX_ID_LEN})")
    if s[0] == "$":
        raise InvalidArgument(f"{what} must not start with '$': {s!r}")
    if "/" in s or _WILDCARDS.search(s):
        raise InvalidArgument(f"{what} must not contain '/', '+' or '#': {s!r}")
    return s


def request_topic(device_id: str, model: str) -> str:
    return f"{PREFIX}/req/{validate_id(device_id, 'device_id')}/{validate_id(model, 'model')}"


def request_filter(shared_group: str | None = None) -> str:
    """The cloud workers' subscription: ``$share/<group>/tandem/v1/req/+/+`` (or unshared)."""
    flt = f"{PREFIX}/req/+/+"
    if shared_group is None:
        return flt
    return f"$share/{validate_id(shared_group, 'shared_group')}/{flt}"


PROBE_LEVEL = "_probe"


def probe_topic(topic_filter: str | None = None) -> str:
    """Where a worker's shared-subscription self-check publishes its probe (SPEC.md §10) for
    ``topic_filter`` (default: the workers' request filter): the filter without its
    ``$share/<group>/`` prefix, each wildcard level replaced by ``_probe`` —
    ``tandem/v1/req/_probe/_probe``. ``_probe`` is no fleet device's id (those start with a
    letter or digit); a worker needs write access to this topic."""
    flt = request_filter() if topic_filter is None else topic_filter
    if flt.startswith("$share/"):
        flt = flt.split("/", 2)[2] if flt.count("/") >= 2 else ""
    return "/".join(PROBE_LEVEL if level in ("+", "#") else level for level in flt.split("/"))


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
