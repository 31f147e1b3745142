"""One row per device: the registry's view (profile, group, assigned bundle) joined with the
device's latest heartbeat. Shared by ``tandem fleet status`` and the dashboard.

Everything a heartbeat carries is the device's word: strings are cut to a sane length and
stripped of control characters before they reach a terminal or a page.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from tandem.protocol.messages import DeviceStatus

__all__ = ["DEFAULT_STALE_S", "DeviceRow", "age_text", "build_rows", "clean_text", "plan_text"]

DEFAULT_STALE_S = 90.0  # an "online" heartbeat older than this shows as "stale"
_MAX_TEXT = 64
_MAX_REASON = 300  # characters of a device's reason for refusing a bundle


def clean_text(text: str, limit: int = _MAX_TEXT) -> str:
    """``text`` without control characters (no terminal escapes), at most ``limit`` long."""
    out = "".join(c if c.isprintable() else "?" for c in text[: limit + 1])
    return out if len(out) <= limit else out[: limit - 1] + "…"


@dataclass
class DeviceRow:
    id: str
    profile: str
    group: str
    state: str  # online | offline | degraded | stale | unseen | (what the device said)
    last_seen_ms: int  # 0 = never
    bundle_digest: str  # reported by the device
    assigned_digest: str  # recorded in the registry
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    fallbacks: int = 0
    queue_depth: int = 0
    rtt_ms: float = 0.0
    uplink_bps: float = 0.0
    plan_mix: list[tuple[str, int]] = field(default_factory=list)
    escalation_ratio: float = 0.0  # a cascade's share of requests escalated (see cascading)
    history: list[tuple[int, float, float]] = field(default_factory=list)
    refused_digest: str = ""  # the last assignment the device refused, and why (heartbeat)
    refused_reason: str = ""

    @property
    def cascading(self) -> bool:
        """True when the window's requests ran a cascade (its plans are in the plan mix)."""
        return any(p == "small" or p.startswith("escalate:") for p, _ in self.plan_mix)

    @property
    def rollout(self) -> str:
        """"" (nothing assigned), "current", "pending", or "refused" (the device refused the
        assigned bundle and runs another: :attr:`refused_reason` says why)."""
        if not self.assigned_digest:
            return ""
        if self.bundle_digest == self.assigned_digest:
            return "current"
        return "refused" if self.refused_digest == self.assigned_digest else "pending"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["rollout"] = self.rollout
        out["plan_mix"] = [list(p) for p in self.plan_mix]
        out["history"] = [list(h) for h in self.history]
        return out


def build_rows(clients: Iterable[Mapping[str, Any]], statuses: Mapping[str, DeviceStatus],
               history: Mapping[str, Iterable[tuple[int, float, float]]], *, now_ms: int,
               stale_after_s: float = DEFAULT_STALE_S) -> list[DeviceRow]:
    """Rows for the enrolled devices in ``clients`` (rows of ``Fleet.clients``)."""
    rows = []
    for client in clients:
        if client["kind"] != "device" or client["state"] != "active":
            continue
        name = client["name"]
        status = statuses.get(name)
        row = DeviceRow(id=name, profile=client["profile"] or "",
                        group=client["group_name"] or "", state="unseen", last_seen_ms=0,
                        bundle_digest="", assigned_digest=client["bundle_digest"] or "")
        if status is not None:
            state = clean_text(status.state, 16)
            if state == "online" and now_ms - status.timestamp_ms > stale_after_s * 1000:
                state = "stale"
            row.state = state
            row.last_seen_ms = status.timestamp_ms
            row.bundle_digest = clean_text(status.bundle_digest, 128)
            row.p50_ms, row.p99_ms = status.p50_ms, status.p99_ms
            row.fallbacks, row.queue_depth = status.fallbacks, status.queue_depth
            row.rtt_ms, row.uplink_bps = status.rtt_ms, status.uplink_bps
            row.plan_mix = [(clean_text(p, 24), n) for p, n in status.plan_mix[:16]]
            row.escalation_ratio = min(1.0, status.escalation_ratio)
            row.history = list(history.get(name, ()))
            if status.refused_digest:
                row.refused_digest = clean_text(status.refused_digest, 128)
                row.refused_reason = clean_text(status.refused_reason or "no reason given",
                                                _MAX_REASON)
        rows.append(row)
    return rows


def age_text(last_ms: int, now_ms: int) -> str:
    if not last_ms:
        return "never"
    s = max(0, (now_ms - last_ms) // 1000)
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m ago"
    if s < 86400:
        return f"{s // 3600}h ago"
    return f"{s // 86400}d ago"


def plan_text(plan_mix: list[tuple[str, int]], top: int = 3) -> str:
    """``local 74% cut 3 25% …``: the largest shares first."""
    total = sum(n for _, n in plan_mix)
    if not total:
        return ""
    ranked = sorted(plan_mix, key=lambda p: -p[1])
    parts = [f"{p} {round(100 * n / total)}%" for p, n in ranked[:top]]
    if len(ranked) > top:
        parts.append("…")
    return " ".join(parts)
