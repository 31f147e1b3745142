"""Tandem on one machine: what the demo, the benchmarks and the tests use to stand in for the
world outside it — a link emulator (a TCP proxy with bandwidth, delay, jitter and outages), an
embedded MQTT 3.1.1 broker for when mosquitto is not installed, and ``tandem demo``.

Nothing here is used by the edge daemon or the cloud endpoint; this package may use theirs.
"""

from __future__ import annotations

from tandem.lab._broker import BrokerStats, EmbeddedBroker, SyncBroker, topic_matches
from tandem.lab._link import (
    PROFILES,
    DirectionStats,
    LinkEmulator,
    LinkProfile,
    LinkStats,
    LinkStep,
    SyncLinkEmulator,
    format_rate,
    parse_rate,
)

__all__ = [
    "PROFILES",
    "BrokerStats",
    "DirectionStats",
    "EmbeddedBroker",
    "LinkEmulator",
    "LinkProfile",
    "LinkStats",
    "LinkStep",
    "SyncBroker",
    "SyncLinkEmulator",
    "format_rate",
    "parse_rate",
    "topic_matches",
]
