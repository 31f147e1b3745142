"""MQTT topics ↔ NATS subjects, as NATS's own MQTT gateway maps them (no NATS import here).

The mapping is the gateway's for every topic Tandem uses, so a NATS-native worker and an MQTT
device meet on the same subject:

======================================  ===================================================
MQTT                                    NATS
======================================  ===================================================
``tandem/v1/req/cam-01/resnet``         subject ``tandem.v1.req.cam-01.resnet``
``tandem/v1/resp/cam-01``               subject ``tandem.v1.resp.cam-01``
filter ``tandem/v1/req/+/+``            subject ``tandem.v1.req.*.*``
filter ``tandem/v1/#``                  subjects ``tandem.v1`` and ``tandem.v1.>`` (MQTT's
                                        ``#`` also matches its parent level)
filter ``#``                            subject ``>``
``$share/workers/tandem/v1/req/+/+``    ``tandem.v1.req.*.*`` in queue group ``workers``
======================================  ===================================================

Each ``/`` becomes ``.`` and back. What the gateway would escape, refuse or read as a wildcard
is refused here with InvalidArgument, before anything is sent:

* an empty level (a topic starting or ending with ``/``, or holding ``//``): the gateway
  escapes it (``/.``, ``./``), which no Tandem topic needs;
* ``.`` in a level: refused by the gateway of NATS 2.9, mapped to ``//`` from 2.10 on — a
  device id ``cam.01`` would reach the workers under a different name on each version;
* a space (the gateway refuses it; NATS subjects hold no whitespace), ``*`` and ``>`` (NATS
  wildcards: a device id ``*`` would publish to every device's subject);
* a first level starting with ``$`` (NATS reserves ``$SYS``, ``$JS``, ``$MQTT``…: a topic
  ``$JS/API/…`` would be a JetStream API call).

So on NATS every id in a topic (device, model, worker, group) must satisfy
:func:`check_nats_id`: :func:`tandem.protocol.topics.validate_id` and none of ``. * >`` or a
space. A subject that maps to no valid topic (sent by a NATS client outside Tandem, or by an
MQTT client whose topic the gateway escaped) is dropped by the receiver and counted.
"""

from __future__ import annotations

from tandem.protocol.errors import InvalidArgument
from tandem.protocol.topics import validate_id
from tandem.protocol.transport import check_filter, check_topic

__all__ = [
    "NATS_FORBIDDEN",
    "check_nats_id",
    "filter_to_subjects",
    "subject_to_topic",
    "topic_to_subject",
]

NATS_FORBIDDEN = frozenset(". *>")
"""Characters a topic level may not hold on NATS (besides what MQTT itself refuses)."""


def _check_level(level: str, where: str) -> None:
    if not level:
        raise InvalidArgument(f"{where}: empty topic levels cannot be mapped to NATS subjects "
                              "(no leading, trailing or double '/')")
    bad = NATS_FORBIDDEN.intersection(level)
    if bad:
        raise InvalidArgument(
            f"{where}: {''.join(sorted(bad))!r} in a topic level cannot travel on NATS "
            "('.' separates subject tokens, '*' and '>' are wildcards, subjects hold no spaces)")


def check_nats_id(s: str | bytes, what: str = "id") -> str:
    """``s`` as a str if it is usable as one topic level on NATS (and MQTT): what
    :func:`~tandem.protocol.topics.validate_id` accepts, without ``.``, ``*``, ``>`` or a space.
    InvalidArgument naming ``what`` otherwise."""
    s = validate_id(s, what)
    bad = NATS_FORBIDDEN.intersection(s)
    if bad:
        raise InvalidArgument(f"{what} contains characters NATS subjects cannot carry "
                              f"{sorted(bad)!r}: {s!r}")
    return s


def topic_to_subject(topic: str) -> str:
    """The NATS subject of an MQTT topic name (InvalidArgument if it has none; see above)."""
    check_topic(topic)
    levels = topic.split("/")
    if levels[0].startswith("$"):
        raise InvalidArgument(f"topic {topic!r}: NATS reserves subjects starting with '$'")
    for level in levels:
        _check_level(level, f"topic {topic!r}")
    return ".".join(levels)


def filter_to_subjects(topic_filter: str) -> tuple[list[str], str | None]:
    """The NATS subjects to subscribe for an MQTT filter, and the queue group (None unless the
    filter is ``$share/<group>/…``). InvalidArgument if it has no NATS equivalent."""
    check_filter(topic_filter)
    group = None
    flt = topic_filter
    if flt.startswith("$share/"):
        _, group, flt = flt.split("/", 2)
        _check_level(group, f"shared subscription {topic_filter!r} (group)")
    levels = flt.split("/")
    if levels[0].startswith("$"):
        raise InvalidArgument(f"filter {topic_filter!r}: NATS reserves subjects starting "
                              "with '$'")
    out = []
    for level in levels:
        if level == "+":
            out.append("*")
        elif level == "#":
            out.append(">")
        else:
            _check_level(level, f"filter {topic_filter!r}")
            out.append(level)
    subjects = [".".join(out)]
    if len(out) > 1 and out[-1] == ">":  # MQTT's a/# matches a itself too
        subjects.append(".".join(out[:-1]))
    return subjects, group


def subject_to_topic(subject: str) -> str | None:
    """The MQTT topic of a NATS subject, or None when no valid topic maps to it (a token that
    the gateway escaped or that holds ``/``, a wildcard or a reserved name)."""
    tokens = subject.split(".")
    if subject.startswith("$"):
        return None
    for token in tokens:
        if not token or "/" in token or "*" in token or ">" in token or " " in token:
            return None
    topic = "/".join(tokens)
    try:
        check_topic(topic)
    except InvalidArgument:
        return None
    return topic
