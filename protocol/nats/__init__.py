"""The NATS transport: :class:`NatsTransport`, the :class:`~tandem.protocol.transport.Transport`
interface over core NATS, for cloud workers that scale out with NATS queue groups while
devices speak MQTT to NATS's MQTT gateway (see :mod:`.transport`).

Topics map to subjects as the gateway maps them (``/`` ↔ ``.``, ``+`` → ``*``, ``#`` → ``>``,
``$share/<group>/…`` → queue group ``<group>``); ids that NATS cannot carry (``.``, ``*``,
``>``, a space) are refused: :func:`check_nats_id`, :func:`topic_to_subject`
(:mod:`._subjects` documents the whole mapping).

Modules: :mod:`._subjects` (the mapping; no NATS import) and :mod:`.transport`. nats-py is
imported when a transport connects, so importing this package needs no extra;
``pip install 'tandem-rt[nats]'`` to connect.
"""

from tandem.protocol.nats._subjects import (
    NATS_FORBIDDEN,
    check_nats_id,
    filter_to_subjects,
    subject_to_topic,
    topic_to_subject,
)
from tandem.protocol.nats.transport import DEFAULT_NATS_PORT, STABLE_LINK_S, NatsTransport

__all__ = [
    "DEFAULT_NATS_PORT",
    "NATS_FORBIDDEN",
    "STABLE_LINK_S",
    "NatsTransport",
    "check_nats_id",
    "filter_to_subjects",
    "subject_to_topic",
    "topic_to_subject",
]
