"""What the daemon knows about the link and the cloud, as moving estimates.

* **RTT** (ms): an EWMA of light probes (a request the cloud answers at once without computing,
  sent when no offload ran for ``probe_interval_s``, or at once when an offload's time does not
  fit the estimates) and of offloads whose transfer is small next to the RTT. An offload's
  *network time* is its round trip minus the cloud's own queue and compute times (from the
  reply); as an RTT sample it counts *minus its bytes at the current uplink estimate* (once
  the uplink was measured). Whether an offload is an RTT sample depends on that transfer time
  (below ``_RTT_SHARE`` of the RTT), not on a fixed size. Probes are pure RTT samples: they
  move the estimate with weight ``_PROBE_ALPHA``, and a probe under half the estimate replaces
  it (the RTT has a floor that noise only adds to) and, when it is also ``_FAR_MS`` below,
  marks the link *changed* (``changed_s``), which makes the planner re-explore offloading plans
  at once. So does an offload whose whole network time is under half the RTT estimate and
  ``_FAR_MS`` below it (the estimate becomes that time, an upper bound, and a probe is asked
  for): after a recovery, the first exploring
  offload corrects the estimate even when offloads are too frequent for idle probes.
* **Bandwidth** (bit/s): an EWMA of ``bytes / (network time - rtt)`` over offloads whose
  transfer time is large enough to measure; the same figure is used for the reply
  (downlink), which this daemon cannot tell apart from the uplink. For
  ``_PROBE_TRUST_S`` after a probe, the RTT is known, so an offload's time beyond it is
  transfer time whatever its size (this is how a collapsed uplink is told from a longer RTT).
  An offload whose network time is under half of ``rtt + bytes at the estimate`` (a stale,
  too low estimate, not noise) raises the estimate (at most 4x a sample).
* **Disagreement**: a sample more than ``_DISAGREE`` times off the estimate (for the RTT either
  way and also more than ``_FAR_MS`` off, so a CPU stall is not taken for a new link; for the
  bandwidth downwards only, as a transfer that looks short is often RTT noise) moves it with
  ``_FAST_ALPHA``, not ``alpha``; a small offload that says the RTT grew that much asks for a
  probe (``probe_wanted``), so the next offload can tell RTT from bandwidth.
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
_RTT_SHARE = 0.25  # an offload whose bytes take less than this share of the RTT: an RTT sample
_DISAGREE = 2.0  # a sample this many times off the estimate moves it with _FAST_ALPHA
_FAST_ALPHA = 0.5
_FAR_MS = 20.0  # ... and, for the RTT, is this far off too (a CPU stall is not a new link)
_PROBE_ALPHA = 0.5  # probes are pure RTT samples
_PROBE_TRUST_S = 5.0  # after a probe, an offload's time beyond the RTT is transfer time
_MAX_RAISE = 4.0  # an offload faster than its estimate raises the uplink at most this much


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

    def add(self, sample: float, now_s: float | None = None,
            alpha: float | None = None) -> float:
        """Add ``sample`` with weight ``alpha`` (default: the average's own)."""
        if self.samples == 0 or self.value is None:
            self.value = float(sample)
        else:
            self.value += (self.alpha if alpha is None else alpha) * (float(sample) - self.value)
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
        self.probed_s = -math.inf  # when a probe last measured the RTT
        self.changed_s = -math.inf  # when a probe last showed the RTT far below the estimate
        self.probe_wanted = False  # an offload did not fit the estimates: probe now

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

    def observe_probe(self, rtt_ms: float, now_s: float | None = None) -> None:
        """A probe answered after ``rtt_ms``: a pure RTT sample (module docstring); the link is
        back if it was down."""
        now = time.monotonic() if now_s is None else now_s
        self.probes_answered += 1
        self.probed_s = now
        self.probe_wanted = False
        est = self.rtt.value
        if est is not None and self.rtt.samples and rtt_ms * _DISAGREE < est:
            self.rtt.add(rtt_ms, now, alpha=1.0)  # the estimate is stale: replace it
            if est - rtt_ms > _FAR_MS:
                self.changed_s = now
        else:
            self.rtt.add(rtt_ms, now, alpha=_PROBE_ALPHA)
        self._recovered()

    @staticmethod
    def _add(e: Ewma, sample: float, now: float, far_ms: float = 0.0,
             fast_up: bool = True) -> None:
        """``sample`` into ``e``, faster when it disagrees strongly with the estimate (by a
        factor of ``_DISAGREE`` and by more than ``far_ms``; upwards only if ``fast_up``)."""
        v = e.value
        far = v is not None and e.samples > 0 and abs(sample - v) > far_ms and (
            (fast_up and sample > v * _DISAGREE) or sample * _DISAGREE < v)
        e.add(sample, now, alpha=_FAST_ALPHA if far else None)

    def observe_probe_failed(self) -> None:
        self._degrade()

    def observe_offload(self, cut_id: int, shape_key: Hashable, *, up_bytes: int,
                        down_bytes: int, round_trip_ms: float, compute_ms: float,
                        queue_ms: float, now_s: float | None = None) -> None:
        """An offload answered: update RTT or bandwidth (module docstring), the cloud queue and
        the cut's tail."""
        now = time.monotonic() if now_s is None else now_s
        self.last_offload_s = self.last_success_s = now
        self.last_cut_sample_s[cut_id] = now
        compute, queue = _ms(compute_ms), _ms(queue_ms)  # the worker's own figures
        if compute is None or queue is None:  # nonsense: the round trip still counts
            self._recovered()
            return
        network_ms = max(0.0, round_trip_ms - compute - queue)
        rtt = self.rtt_ms
        nbytes = up_bytes + down_bytes
        bw_measured = self.bandwidth.samples > 0
        xfer_est_ms = nbytes * 8000.0 / self.uplink_bps  # its bytes at the current estimate
        probed = now - self.probed_s < _PROBE_TRUST_S
        if self.rtt.samples and network_ms * _DISAGREE < rtt and rtt - network_ms > _FAR_MS:
            # the whole round trip took less than half the RTT estimate: the estimate is stale
            # (an upper bound replaces it, a probe refines it) and the link changed
            self.rtt.add(network_ms, now, alpha=1.0)
            self.changed_s = now
            self.probe_wanted = True
        elif not probed and xfer_est_ms <= _RTT_SHARE * rtt:
            sample = max(0.0, network_ms - xfer_est_ms) if bw_measured else network_ms
            if self.rtt.samples and sample > rtt * _DISAGREE + _FAR_MS:
                self.probe_wanted = True  # RTT or bandwidth? a probe will tell
            self._add(self.rtt, sample, now, _FAR_MS)
        elif self.rtt.samples:
            transfer_ms = network_ms - rtt
            if transfer_ms > max(_MIN_TRANSFER_MS, 0.2 * network_ms):
                bps = nbytes * 8 / (transfer_ms / 1e3)
                if xfer_est_ms <= _RTT_SHARE * rtt:  # small: told apart by a probe, noisier
                    self.bandwidth.add(bps, now)
                else:  # fast down (a collapse), not up: a short transfer is often RTT noise
                    self._add(self.bandwidth, bps, now, fast_up=False)
            elif bw_measured and xfer_est_ms > _RTT_SHARE * rtt and \
                    network_ms * _DISAGREE < rtt + xfer_est_ms:
                # much faster than the estimate says, too fast to measure: raise it (bounded)
                faster = xfer_est_ms / max(transfer_ms, _MIN_TRANSFER_MS, xfer_est_ms / _MAX_RAISE)
                self.bandwidth.add(self.uplink_bps * faster, now)
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
            "changed_s_ago": None if math.isinf(self.changed_s) else
            round(time.monotonic() - self.changed_s, 1),
        }
