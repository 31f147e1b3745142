"""Logging for what peers send: a hostile peer must not be able to flood the log."""

from __future__ import annotations

import logging
import time

__all__ = ["Throttled", "log"]

log = logging.getLogger("tandem.protocol.transport")


class Throttled:
    """Warnings about peers' messages, at most one per ``kind`` every ``every_s`` seconds; the
    next one says how many were held back."""

    __slots__ = ("_held", "_next", "every_s")

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, kind: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next.get(kind, 0.0):
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        self._next[kind] = now + self.every_s
        held = self._held.pop(kind, 0)
        if held:
            msg += " (%d more like it in the last %gs)"
            args = (*args, held, self.every_s)
        log.warning(msg, *args)
