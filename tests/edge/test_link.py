"""The link estimator: RTT and bandwidth from real transfers, the cloud's queue and tail times
from replies and load reports, degraded mode and recovery."""

from __future__ import annotations

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
