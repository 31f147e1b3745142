"""What a request to the daemon is and what it gets back: :class:`RequestOptions` (the local
API's per-request parameters), :class:`Answer` and :class:`Deferred`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Answer", "Deferred", "RequestOptions"]


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """Per-request parameters of the local API. ``mode``: auto | local | cloud | cascade | split
    (then ``cut_id``); ``deadline_ms``: the time the caller gives the daemon; ``priority``: higher
    runs first (local compute and the cloud's queue); ``deferrable``: a ``cloud`` request may
    be spooled when the cloud is unreachable (HTTP 202 + id)."""

    mode: str = "auto"
    cut_id: int | None = None
    deadline_ms: float = 1000.0
    priority: int = 0
    deferrable: bool = False
    spool_format: dict[str, Any] | None = None  # kept with a spooled request for its answer


@dataclass
class Answer:
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any]
    model: str
    version: str = ""


@dataclass(frozen=True)
class Deferred:
    """A deferrable request accepted into the spool: fetch its result by ``id``."""

    id: str
    model: str
