"""Topic names and filters as brokers accept them, checked before anything is sent.

A broker that receives a topic it calls malformed drops the connection, and an MQTT client
re-sends its unacknowledged PUBLISHes and its subscriptions after every reconnect: one bad topic
becomes a reconnect loop. So every topic a transport publishes to and every filter it subscribes
to is checked here first, against what MQTT brokers accept (MQTT 5 §1.5.4 and §4.7, as
mosquitto enforces it): well-formed UTF-8 of at most 65,535 bytes without the characters
:func:`tandem.protocol.topics.refused_character` finds (U+0000, control characters,
noncharacters); wildcards only in filters, each ``+`` and ``#`` alone in its level and
``#`` last; a shared subscription is ``$share/<group>/<filter>`` with a non-empty group without
wildcards.

The same language is used by every transport (the NATS transport maps it to subjects).
"""

from __future__ import annotations

from tandem.protocol.errors import InvalidArgument
from tandem.protocol.topics import refused_character

__all__ = ["check_filter", "check_topic", "topic_matches"]

MAX_TOPIC_BYTES = 65_535


def _check_text(s: object, what: str) -> str:
    if not isinstance(s, str):
        raise InvalidArgument(f"{what} must be a str, not {type(s).__name__}")
    if not s:
        raise InvalidArgument(f"{what} must not be empty")
    bad = refused_character(s)
    if bad is not None:
        raise InvalidArgument(f"{what} {s!r} holds U+{ord(bad):04X}, a control character or "
                              "noncharacter that MQTT brokers refuse")
    try:
        n = len(s.encode("utf-8"))
    except UnicodeEncodeError as exc:  # lone surrogates
        raise InvalidArgument(f"{what} {s!r} is not valid UTF-8") from exc
    if n > MAX_TOPIC_BYTES:
        raise InvalidArgument(f"{what} is {n} bytes of UTF-8 (at most {MAX_TOPIC_BYTES})")
    return s


def check_topic(topic: str) -> str:
    """``topic`` if a broker accepts it as a PUBLISH topic name; InvalidArgument otherwise."""
    _check_text(topic, "topic")
    if "+" in topic or "#" in topic:
        raise InvalidArgument(f"topic {topic!r} holds a wildcard (+ or #): only filters may")
    return topic


def check_filter(topic_filter: str) -> str:
    """``topic_filter`` if a broker accepts it in a SUBSCRIBE; InvalidArgument otherwise."""
    _check_text(topic_filter, "topic filter")
    flt = topic_filter
    if flt.startswith("$share/"):
        _, group, *rest = flt.split("/", 2)
        if not group or "+" in group or "#" in group or not rest or not rest[0]:
            raise InvalidArgument(f"shared subscription {topic_filter!r} must be "
                                  "$share/<group>/<filter> (group without wildcards)")
        flt = rest[0]
    levels = flt.split("/")
    for i, level in enumerate(levels):
        if ("+" in level or "#" in level) and len(level) != 1:
            raise InvalidArgument(f"topic filter {topic_filter!r}: a wildcard must fill its level")
        if level == "#" and i != len(levels) - 1:
            raise InvalidArgument(f"topic filter {topic_filter!r}: '#' must be the last level")
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (``+``, ``#``, ``$share/<group>/`` prefix, ``$`` topics)."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        topic_filter = parts[2] if len(parts) == 3 else ""
    f = topic_filter.split("/")
    t = topic.split("/")
    if topic.startswith("$") and f[0] in ("+", "#"):
        return False
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(f) == len(t)
