"""The link estimator: RTT and bandwidth from real transfers, the cloud's queue and tail times
from replies and load reports, degraded mode and recovery."""

from __future__ import annotations

import math

import pytest

from tandem.edge import LinkEstimator
from tandem.protocol.messages import CloudLoad

KEY = ((1, 3, 16, 16),)


def test_priors_until_measured():
    link = LinkEstimator(prior_uplink_mbps=8, prior_rtt_ms=30)
    assert link.rtt_ms == 30 and link.uplink_bps == 8e6
    snap = link.snapshot()
    assert not snap["rtt_measured"] and not snap["uplink_measured"] and not snap["available"]


def test_rtt_from_small_transfers_and_bandwidth_from_large_ones():
    link = LinkEstimator()
    link.observe_connected(True)
    # small: network time = round trip - cloud queue - cloud compute = 5 ms
    link.observe_offload(0, KEY, up_bytes=1000, down_bytes=40, round_trip_ms=8.0,
                         compute_ms=2.0, queue_ms=1.0)
    assert link.rtt_ms == pytest.approx(5.0)
    # 1 MB up + 40 B down in 5 + 80 ms of network time: (1e6 + 40) * 8 / 0.080 s = 100 Mbit/s
    link.observe_offload(3, KEY, up_bytes=1_000_000, down_bytes=40, round_trip_ms=88.0,
                         compute_ms=2.0, queue_ms=1.0)
    assert link.uplink_bps == pytest.approx(100e6, rel=1e-3)
    assert link.rtt_ms == pytest.approx(5.0)  # large transfers do not move the RTT
    assert link.cloud_tail_ms("d", 3, KEY) == pytest.approx(2.0)
    assert link.queue_ms == pytest.approx(1.0)
    assert link.snapshot()["uplink_measured"]


def test_load_reports_give_queue_and_tail_times_and_expire():
    link = LinkEstimator()
    link.observe_load(CloudLoad(worker_id="w1", timestamp_ms=0, queue_ms=4.0,
                                tail_ms=(("d", 3, 6.0), ("d", 0, 9.0))))
    link.observe_load(CloudLoad(worker_id="w2", timestamp_ms=0, queue_ms=8.0,
                                tail_ms=(("d", 3, 10.0),)))
    assert link.cloud_tail_ms("d", 3, KEY) == pytest.approx(8.0)  # mean over workers
    assert link.cloud_tail_ms("other", 3, KEY) is None
    assert link.workers() == 2 and link.queue_ms > 0
    link._workers["w2"].received_s -= 3600  # a report an hour old no longer counts
    link._reported["d", 3] = (link._reported["d", 3][0], 0.0)
    assert link.cloud_tail_ms("d", 3, KEY) == pytest.approx(6.0)
    link.observe_load(CloudLoad(worker_id="w1", timestamp_ms=0, state="offline")
                      if "state" in CloudLoad.__dataclass_fields__ else
                      CloudLoad(worker_id="w1", timestamp_ms=0))
    # replies measured for this shape win over reports
    link.observe_offload(0, KEY, up_bytes=10, down_bytes=10, round_trip_ms=3, compute_ms=1.5,
                         queue_ms=0)
    assert link.cloud_tail_ms("d", 0, KEY) == pytest.approx(1.5)


def test_a_flood_of_fake_workers_is_bounded():
    link = LinkEstimator()
    for i in range(3000):
        link.observe_load(CloudLoad(worker_id=f"w{i}", timestamp_ms=0))
    assert len(link._workers) <= 1024


def test_degraded_after_failures_and_back_after_a_probe():
    link = LinkEstimator(failures_to_degrade=3)
    link.observe_connected(True)
    assert link.available
    link.observe_offload_failed(3, KEY, waited_ms=40, timed_out=True)
    link.observe_offload_failed(3, KEY, waited_ms=40, timed_out=True)
    assert link.available and link.cloud_tail_ms("d", 3, KEY) == pytest.approx(40)
    link.observe_offload_failed(3, KEY, waited_ms=40, timed_out=False)
    assert not link.available and link.snapshot()["degraded"]
    link.observe_probe(2.0)
    assert link.available and link.failures == 0
    assert link.cloud_tail_ms("d", 3, KEY) is None  # the timeouts' lower bounds are dropped
    link.observe_connected(False)
    assert not link.available
    link.observe_connected(True)
    assert not link.available  # a reconnect alone is not enough: a probe must answer
    link.observe_probe(1.0)
    assert link.available


def test_nonsense_figures_from_a_peer_are_ignored():
    link = LinkEstimator()
    link.observe_connected(True)
    link.observe_load(CloudLoad(worker_id="w1", timestamp_ms=0, queue_ms=float("nan"),
                                tail_ms=(("d", 3, float("inf")), ("d", 1, -5.0), ("d", 0, 2.0))))
    assert link.queue_ms == 0.0 and link.cloud_tail_ms("d", 3, KEY) is None
    link.observe_load(CloudLoad(worker_id="w1", timestamp_ms=0, queue_ms=1.0,
                                tail_ms=(("d", 3, float("inf")), ("d", 0, 2.0))))
    assert link.cloud_tail_ms("d", 3, KEY) is None and link.cloud_tail_ms("d", 0, KEY) == 2.0
    link.observe_offload(3, KEY, up_bytes=10, down_bytes=10, round_trip_ms=5.0,
                         compute_ms=float("nan"), queue_ms=1e300)
    assert link.rtt.samples == 0 and link.cloud_tail_ms("d", 3, KEY) is None
    assert link.available


def _measured(rtt_ms=10.0, mbps=20.0):
    """A link whose RTT and uplink were measured (10 ms, 20 Mbit/s)."""
    link = LinkEstimator(prior_uplink_mbps=mbps, prior_rtt_ms=rtt_ms)
    link.observe_connected(True)
    link.rtt.add(rtt_ms, 0.0)
    link.bandwidth.add(mbps * 1e6, 0.0)
    return link


def test_large_transfers_do_not_inflate_the_rtt():
    link = _measured(10.0, 20.0)
    # 12 KiB (under the old fixed 16 KiB rule) on a link that is now 1 Mbit/s: 98 ms of
    # transfer. At the 20 Mbit/s estimate its bytes take 4.9 ms, half the RTT: not an RTT
    # sample, a bandwidth one
    n = 12 * 1024
    link.observe_offload(3, KEY, up_bytes=n, down_bytes=0, round_trip_ms=10 + n * 8 / 1e3,
                         compute_ms=0.0, queue_ms=0.0, now_s=1.0)
    assert link.rtt_ms == pytest.approx(10.0)
    assert link.uplink_bps < 12e6  # moved fast: the sample is 20x off the estimate
    # a small transfer is an RTT sample minus its bytes at the current estimate
    before = link.uplink_bps
    link.observe_offload(3, KEY, up_bytes=100, down_bytes=0, round_trip_ms=12.0,
                         compute_ms=0.0, queue_ms=0.0, now_s=2.0)
    assert link.rtt_ms == pytest.approx(10 + 0.2 * (12 - 100 * 8000 / before - 10))


def test_a_probe_far_below_the_estimate_replaces_it_and_marks_the_link_changed():
    link = _measured(150.0, 1.0)
    link.observe_probe(140.0, now_s=1.0)  # close: a pure sample, weight 0.5
    assert link.rtt_ms == pytest.approx(145.0) and link.changed_s == -math.inf
    link.observe_probe(12.0, now_s=2.0)  # the link is back: no slow walk down from 145 ms
    assert link.rtt_ms == pytest.approx(12.0) and link.changed_s == 2.0


def test_an_offload_the_estimates_cannot_explain_asks_for_a_probe_which_tells_rtt_from_bandwidth():
    link = _measured(10.0, 20.0)
    # 3 KiB: 1.2 ms at 20 Mbit/s, so an RTT sample, but it took 124 ms (3g: 100 ms RTT and
    # 1 Mbit/s): more than twice the RTT -> ask for a probe
    n = 3 * 1024
    link.observe_offload(3, KEY, up_bytes=n, down_bytes=0, round_trip_ms=100 + n * 8 / 1e3,
                         compute_ms=0.0, queue_ms=0.0, now_s=1.0)
    assert link.probe_wanted
    link.observe_probe(100.0, now_s=1.1)
    assert not link.probe_wanted
    rtt = link.rtt_ms
    bw = link.uplink_bps
    # after the probe the RTT is known: the rest of the same offload is transfer time
    link.observe_offload(3, KEY, up_bytes=n, down_bytes=0, round_trip_ms=124.6,
                         compute_ms=0.0, queue_ms=0.0, now_s=1.5)
    assert link.rtt_ms == rtt and link.uplink_bps < bw


def test_an_offload_much_faster_than_its_bytes_at_the_estimate_raises_the_uplink_bounded():
    link = _measured(10.0, 1.0)  # the estimate says 1 Mbit/s, the link does 100
    n = 100_000  # 800 ms at the estimate, 8 ms really
    link.observe_offload(3, KEY, up_bytes=n, down_bytes=0, round_trip_ms=18.0,
                         compute_ms=0.0, queue_ms=0.0, now_s=1.0)
    assert link.uplink_bps == pytest.approx(1e6 + 0.2 * (100e6 - 1e6))  # measurable
    link = _measured(10.0, 1.0)
    link.observe_offload(3, KEY, up_bytes=n, down_bytes=0, round_trip_ms=10.2,
                         compute_ms=0.0, queue_ms=0.0, now_s=1.0)
    assert 1e6 < link.uplink_bps <= 1e6 + 0.2 * 3e6  # too fast to measure: at most 4x a sample


def test_round_trip_noise_does_not_inflate_the_uplink():
    link = _measured(10.0, 100.0)  # wired: 150 KB take 12 ms
    n = 150_000
    seen = []
    for i, noise_ms in enumerate([-6.0, 3.0, -10.0, 1.0, -9.5, 4.0, -6.0, 2.0] * 5):
        link.observe_offload(3, KEY, up_bytes=n, down_bytes=0,
                             round_trip_ms=10 + 12 + noise_ms, compute_ms=0.0, queue_ms=0.0,
                             now_s=float(i))
        seen.append(link.uplink_bps)
    assert min(seen) > 60e6 and max(seen) < 200e6  # a transfer that looks short is not "4x"
    assert link.rtt_ms == pytest.approx(10.0)  # large transfers are not RTT samples


def test_an_offload_faster_than_half_the_rtt_estimate_replaces_it():
    link = _measured(110.0, 1.0)  # learnt on 3g; the link is back to 10 ms
    link.observe_offload(3, KEY, up_bytes=3000, down_bytes=0, round_trip_ms=15.0,
                         compute_ms=2.0, queue_ms=0.0, now_s=5.0)
    assert link.rtt_ms == pytest.approx(13.0)  # an upper bound, refined by the probe it asks
    assert link.changed_s == 5.0 and link.probe_wanted
    link.observe_probe(10.0, now_s=5.1)
    assert link.rtt_ms == pytest.approx(11.5) and not link.probe_wanted
