"""What the daemon knows about the link and the cloud, as moving estimates.

* **RTT** (ms): an EWMA of light probes (a request the cloud answers at once without computing,
  sent when no offload ran for ``probe_interval_s``) and of small offloads, each sample the
  offload's round trip minus the cloud's own queue and compute times (from the reply).
* **Bandwidth** (bit/s): an EWMA of ``bytes / (network time - rtt)`` over offloads whose
  transfer time is large enough to measure; the same figure is used for the reply
  (downlink), which this daemon cannot tell apart from the uplink.
* **Cloud queue** (ms): an EWMA of the queue time in replies and of the workers' retained load
  reports (the mean over online workers whose report is fresh).
* **Cloud tail** (ms) per cut: the compute time in replies, per (cut, input shape), else the
  mean ``tail_ms`` the fresh load reports give for (model digest, cut), else unknown (the
  planner then uses its prior).
* **Availability**: the link is usable while the transport is connected and fewer than
  ``failures_to_degrade`` offloads in a row failed; otherwise the daemon is *degraded* (all
  local) and probes until one answers.

Samples start from priors (``prior_uplink_mbps``, ``prior_rtt_ms``) until measured; every
figure says whether it is measured. All methods run on the daemon's event loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

__all__ = ["Ewma", "LinkEstimator"]

_LOAD_FRESH_S = 15.0
_MAX_TAIL_KEYS = 4096
_MIN_TRANSFER_MS = 0.5  # below this the transfer time cannot be told from noise
_SMALL_BYTES = 16 * 1024  # an offload this small is a round-trip sample


_MAX_MS = 1e7  # a figure past this (or negative, or not finite) from a peer is ignored


def _ms(value: Any) -> float | None:
    """A duration a peer reported, or None when it cannot be one."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and 0.0 <= v <= _MAX_MS else None


class Ewma:
    """An exponentially weighted moving average (the first sample sets it)."""

    __slots__ = ("alpha", "samples", "updated_s", "value")

    def __init__(self, alpha: float = 0.2, value: float | None = None) -> None:
        self.alpha = alpha
        self.value = value
        self.samples = 0
        self.updated_s = 0.0

    def add(self, sample: float, now_s: float | None = None) -> float:
        if self.samples == 0 or self.value is None:
            self.value = float(sample)
        else:
            self.value += self.alpha * (float(sample) - self.value)
        self.samples += 1
        self.updated_s = time.monotonic() if now_s is None else now_s
        return self.value


@dataclass
class _WorkerLoad:
    received_s: float
    queue_ms: float
    queue_depth: int
    tail_ms: dict[tuple[str, int], float]


class LinkEstimator:
    """Moving estimates of the link and the cloud (see the module docstring)."""

    def __init__(self, *, prior_uplink_mbps: float = 10.0, prior_rtt_ms: float = 20.0,
                 failures_to_degrade: int = 3, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.prior_bps = prior_uplink_mbps * 1e6
        self.prior_rtt_ms = prior_rtt_ms
        self.failures_to_degrade = failures_to_degrade
        self.rtt = Ewma(alpha)
        self.bandwidth = Ewma(alpha)
        self.queue = Ewma(alpha)
        self._tail: dict[tuple[int, Hashable], Ewma] = {}
        self._timeout_tails: set[tuple[int, Hashable]] = set()
        self._workers: dict[str, _WorkerLoad] = {}
        self._reported: dict[tuple[str, int], tuple[float, float]] = {}
        self.connected = False
        self.failures = 0  # offloads in a row that failed
        self.degraded_since: float | None = None
        self.last_offload_s = 0.0
        self.last_success_s = 0.0
        self.last_cut_sample_s: dict[int, float] = {}
        self.probes_sent = 0
        self.probes_answered = 0

    # -- what the planner reads -----------------------------------------------------------------

    @property
    def rtt_ms(self) -> float:
        return self.rtt.value if self.rtt.value is not None else self.prior_rtt_ms

    @property
    def uplink_bps(self) -> float:
        return self.bandwidth.value if self.bandwidth.value is not None else self.prior_bps

    @property
    def queue_ms(self) -> float:
        return self.queue.value if self.queue.value is not None else 0.0

    @property
    def available(self) -> bool:
        """The cloud may be offloaded to: connected and not degraded."""
        return self.connected and self.degraded_since is None

    def cloud_tail_ms(self, model_digest: str, cut_id: int, shape_key: Hashable,
                      now_s: float | None = None) -> float | None:
        """Expected cloud compute time of cut ``cut_id``'s tail for this input shape, or None
        when nothing measured it."""
        e = self._tail.get((cut_id, shape_key))
        if e is not None:
            return e.value
        reported = self._reported.get((model_digest, cut_id))
        if reported is None:
            return None
        if (time.monotonic() if now_s is None else now_s) > reported[1]:
            self._reported_tails()
            reported = self._reported.get((model_digest, cut_id))
        return None if reported is None else reported[0]

    def _reported_tails(self) -> None:
        """The mean tail time per (digest, cut) over the fresh load reports, each with the time
        it stops being fresh (recomputed on each report and when one expires)."""
        now = time.monotonic()
        sums: dict[tuple[str, int], list[float]] = {}
        for w in self._workers.values():
            if now - w.received_s >= _LOAD_FRESH_S:
                continue
            until = w.received_s + _LOAD_FRESH_S
            for key, ms in w.tail_ms.items():
                entry = sums.setdefault(key, [0.0, 0, until])
                entry[0] += ms
                entry[1] += 1
                entry[2] = min(entry[2], until)
        self._reported = {k: (v[0] / v[1], v[2]) for k, v in sums.items()}

    def cut_measured(self, cut_id: int, shape_key: Hashable) -> bool:
        return (cut_id, shape_key) in self._tail

    # -- what the daemon reports ----------------------------------------------------------------

    def observe_connected(self, connected: bool) -> None:
        self.connected = connected
        if not connected:
            self._degrade()

    def observe_probe(self, rtt_ms: float) -> None:
        """A probe answered after ``rtt_ms``: the link is back if it was down."""
        self.probes_answered += 1
        self.rtt.add(rtt_ms)
        self._recovered()

    def observe_probe_failed(self) -> None:
        self._degrade()

    def observe_offload(self, cut_id: int, shape_key: Hashable, *, up_bytes: int,
                        down_bytes: int, round_trip_ms: float, compute_ms: float,
                        queue_ms: float) -> None:
        """An offload answered: update RTT or bandwidth, the cloud queue and the cut's tail."""
        now = time.monotonic()
        self.last_offload_s = self.last_success_s = now
        self.last_cut_sample_s[cut_id] = now
        compute, queue = _ms(compute_ms), _ms(queue_ms)  # the worker's own figures
        if compute is None or queue is None:  # nonsense: the round trip still counts
            self._recovered()
            return
        network_ms = max(0.0, round_trip_ms - compute - queue)
        transfer_ms = network_ms - self.rtt_ms
        nbytes = up_bytes + down_bytes
        if nbytes < _SMALL_BYTES:
            self.rtt.add(network_ms, now)
        elif self.rtt.samples and transfer_ms > max(_MIN_TRANSFER_MS, 0.2 * network_ms):
            self.bandwidth.add(nbytes * 8 / (transfer_ms / 1e3), now)
        self.queue.add(queue, now)
        self._tail_ewma(cut_id, shape_key).add(compute, now)
        self._timeout_tails.discard((cut_id, shape_key))
        self._recovered()

    def observe_offload_failed(self, cut_id: int, shape_key: Hashable, *, waited_ms: float,
                               timed_out: bool) -> None:
        """An offload failed (timed out after ``waited_ms``, or an error): count it; a timeout
        also says the cut's cloud time is at least what was waited."""
        now = time.monotonic()
        self.last_offload_s = now
        self.failures += 1
        if timed_out:
            e = self._tail_ewma(cut_id, shape_key)
            e.add(max(waited_ms, e.value or 0.0), now)
            self._timeout_tails.add((cut_id, shape_key))
        if self.failures >= self.failures_to_degrade:
            self._degrade()

    def observe_load(self, load: Any) -> None:
        """A worker's retained load report (a :class:`~tandem.protocol.CloudLoad`)."""
        if getattr(load, "state", "online") == "offline":
            self._workers.pop(load.worker_id, None)
            self._reported_tails()
            return
        tails = {(d, int(c)): v for d, c, ms in load.tail_ms[:_MAX_TAIL_KEYS]
                 if (v := _ms(ms)) is not None}
        queue_ms = _ms(load.queue_ms)
        if queue_ms is None:
            return
        self._workers[load.worker_id] = _WorkerLoad(time.monotonic(), queue_ms,
                                                    int(load.queue_depth), tails)
        if len(self._workers) > 1024:  # a flood of fake workers must not grow this forever
            oldest = min(self._workers, key=lambda w: self._workers[w].received_s)
            del self._workers[oldest]
        fresh = [w.queue_ms for w in self._workers.values()
                 if time.monotonic() - w.received_s < _LOAD_FRESH_S]
        if fresh:
            self.queue.add(sum(fresh) / len(fresh))
        self._reported_tails()

    def workers(self) -> int:
        now = time.monotonic()
        return sum(1 for w in self._workers.values() if now - w.received_s < _LOAD_FRESH_S)

    def _tail_ewma(self, cut_id: int, shape_key: Hashable) -> Ewma:
        key = (cut_id, shape_key)
        e = self._tail.get(key)
        if e is None:
            if len(self._tail) >= _MAX_TAIL_KEYS:
                self._tail.pop(next(iter(self._tail)))
            e = self._tail[key] = Ewma(self.alpha)
        return e

    def _degrade(self) -> None:
        if self.degraded_since is None:
            self.degraded_since = time.monotonic()

    def _recovered(self) -> None:
        self.failures = 0
        if self.degraded_since is not None:
            self.degraded_since = None
            for key in self._timeout_tails:  # measured again from now on
                self._tail.pop(key, None)
            self._timeout_tails.clear()

    def snapshot(self) -> dict[str, Any]:
        return {
            "connected": self.connected, "available": self.available,
            "degraded": self.degraded_since is not None,
            "rtt_ms": round(self.rtt_ms, 3), "rtt_measured": self.rtt.samples > 0,
            "uplink_bps": round(self.uplink_bps), "uplink_measured": self.bandwidth.samples > 0,
            "cloud_queue_ms": round(self.queue_ms, 3), "cloud_workers": self.workers(),
            "failures_in_a_row": self.failures,
            "probes_sent": self.probes_sent, "probes_answered": self.probes_answered,
        }
