"""The cost model and the planner on a real bundle's manifest with chosen device times and
link figures: the plan with the lowest expected latency, deadlines, hysteresis, degraded mode,
exploration, forced modes, per-shape frontier sizes, and new plan kinds."""

from __future__ import annotations

import math

import pytest

from tandem.edge import CostModel, Estimate, LinkEstimator, Plan, Planner
from tandem.edge._profiler import PartTiming, ProfileTable
from tandem.protocol.bundle import load_bundle
from tandem.protocol.errors import InvalidArgument
from tandem.protocol.messages import CloudLoad

KEY = ((1, 3, 16, 16),)
NEVER = math.inf


@pytest.fixture
def manifest(residual_bundle):
    with load_bundle(residual_bundle) as b:
        return b.manifest


def _table(manifest, times):
    """``times``: part path -> ms. Frontier sizes: the manifest's (raw), fp16 / int8 shares."""
    t = ProfileTable("d" * 64, "cpu-x86_64", {"input": (1, 3, 16, 16)})
    for part, ms in times.items():
        t.parts[part] = {"onnxruntime": PartTiming(ms, ms, 10)}
    for cut in manifest.cuts:
        if not cut.local_only:
            raw = cut.frontier_bytes
            t.frontier_bytes[cut.id] = {"raw": raw, "fp16": raw // 2, "int8": raw // 4}
            t.encode_ms[cut.id] = {"raw": 0.01, "fp16": 0.02, "int8": 0.03}
    t.output_bytes = 40
    return t


def _times(manifest, *, full=10.0, heads=None, tails=None):
    heads, tails = heads or {}, tails or {}
    out = {"parts/full.onnx": full}
    for cut in manifest.cuts:
        if cut.head_part and cut.tail_part:
            out[cut.head_part] = heads.get(cut.id, 1.0)
            out[cut.tail_part] = tails.get(cut.id, full)
    return out


def _link(*, rtt_ms=1.0, mbps=1000.0, cloud=None, digest="", queue_ms=0.0):
    link = LinkEstimator(prior_uplink_mbps=mbps, prior_rtt_ms=rtt_ms)
    link.observe_connected(True)
    if cloud:
        link.observe_load(CloudLoad(worker_id="w1", timestamp_ms=0, queue_ms=queue_ms,
                                    tail_ms=tuple((digest, c, ms) for c, ms in cloud.items())))
    return link


def _planner(manifest, link, table, **kw):
    cost = CostModel(manifest, "d" * 64, table, link)
    kw.setdefault("explore_interval_s", NEVER)
    return Planner(cost, link, **kw)


def _cloud_tails(manifest, ms):
    return {c.id: ms for c in manifest.cuts if not c.local_only}


def test_fast_link_and_fast_cloud_send_the_raw_input(manifest):
    link = _link(rtt_ms=1, mbps=1000, cloud=_cloud_tails(manifest, 0.1),
                 digest=manifest.source_digest)
    d = _planner(manifest, link, _table(manifest, _times(manifest))).decide(KEY, 100)
    assert d.plan.kind == "cloud"
    e = d.estimate
    assert e.total_ms == pytest.approx(e.head_ms + e.encode_ms + e.uplink_ms + e.rtt_ms +
                                       e.queue_ms + e.tail_ms + e.reply_ms)
    assert e.tail_measured and "lowest expected latency" in d.reason


def test_a_slow_link_keeps_everything_local(manifest):
    link = _link(rtt_ms=50, mbps=0.01, cloud=_cloud_tails(manifest, 0.1),
                 digest=manifest.source_digest)
    d = _planner(manifest, link, _table(manifest, _times(manifest))).decide(KEY, 1000)
    assert d.plan.kind == "local" and "fastest expected" in d.reason


def test_a_split_wins_when_the_head_shrinks_the_data(manifest):
    cut15 = max(c.id for c in manifest.cuts if c.head_part and c.tail_part)
    times = _times(manifest, full=10, heads={cut15: 4.0}, tails={cut15: 5.0})
    link = _link(rtt_ms=1, mbps=0.1, cloud=_cloud_tails(manifest, 0.1),
                 digest=manifest.source_digest)
    d = _planner(manifest, link, _table(manifest, times)).decide(KEY, 1000)
    assert d.plan == Plan("split", cut15, "int8")  # smallest verified encoding on a slow link


def test_plans_whose_fallback_cannot_meet_the_deadline_are_not_chosen(manifest):
    cut1 = min(c.id for c in manifest.cuts if c.head_part and c.tail_part)
    # cut 1 is the fastest expected, but finishing it here after a failure takes 31 ms
    times = _times(manifest, full=10, heads={cut1: 1.0}, tails={cut1: 30.0})
    tails = {c: 50.0 for c in _cloud_tails(manifest, 0)}
    tails[cut1] = 0.1
    link = _link(rtt_ms=0.5, mbps=1000, cloud=tails, digest=manifest.source_digest)
    planner = _planner(manifest, link, _table(manifest, times))
    assert planner.decide(KEY, 1000).plan.cut_id == cut1
    planner = _planner(manifest, link, _table(manifest, times))
    assert planner.decide(KEY, 20).plan.kind == "local"


def test_no_plan_meets_the_deadline_says_so(manifest):
    link = _link(rtt_ms=50, mbps=0.01)
    d = _planner(manifest, link, _table(manifest, _times(manifest, full=40))).decide(KEY, 5)
    assert d.plan.kind == "local" and "no plan is expected to meet the 5 ms deadline" in d.reason


def test_hysteresis_keeps_the_plan_until_the_gain_is_worth_it(manifest):
    times = _times(manifest, full=10)
    link = _link(rtt_ms=1, mbps=1000, cloud=_cloud_tails(manifest, 20.0),
                 digest=manifest.source_digest)
    planner = _planner(manifest, link, _table(manifest, times), hysteresis=0.2)

    def cloud_tails(ms):
        link.observe_load(CloudLoad(worker_id="w1", timestamp_ms=0, tail_ms=tuple(
            (manifest.source_digest, c, ms) for c in _cloud_tails(manifest, 0))))

    assert planner.decide(KEY, 100).plan.kind == "local"
    cloud_tails(7.5)  # the cloud is now ~10 % faster than local: not worth a switch
    local = planner.cost.estimate(planner.local_plan, KEY).total_ms
    best = min(planner.cost.estimate(p, KEY).total_ms for p in planner.cost.plans())
    assert local / 1.2 < best < local
    d = planner.decide(KEY, 100)
    assert d.plan.kind == "local" and d.reason.startswith("kept local")
    cloud_tails(1.0)  # now clearly faster
    assert planner.decide(KEY, 100).plan.kind == "cloud"
    cloud_tails(7.5)  # and it stays there until local is clearly better again
    assert planner.decide(KEY, 100).plan.kind == "cloud"


def test_degraded_or_disconnected_means_local(manifest):
    link = _link(cloud=_cloud_tails(manifest, 0.1), digest=manifest.source_digest)
    planner = _planner(manifest, link, _table(manifest, _times(manifest)))
    assert planner.decide(KEY, 100).plan.kind == "cloud"
    for _ in range(link.failures_to_degrade):
        link.observe_offload_failed(0, KEY, waited_ms=100, timed_out=True)
    d = planner.decide(KEY, 100)
    assert d.plan.kind == "local" and "degraded" in d.reason
    link.observe_probe(1.0)  # the cloud answers again
    assert link.available
    link.observe_connected(False)
    assert "not connected" in planner.decide(KEY, 100).reason


def test_unmeasured_cuts_are_explored_once_per_interval(manifest):
    link = _link(rtt_ms=1, mbps=100)  # no cloud measurement at all: priors
    planner = _planner(manifest, link, _table(manifest, _times(manifest, full=2)),
                       explore_interval_s=3600)
    first = planner.decide(KEY, 1000)
    assert first.exploring and first.plan.offloads and "exploring" in first.reason
    seen = {first.plan.cut_id}
    for _ in range(10):
        d = planner.decide(KEY, 1000)
        if d.exploring:
            assert d.plan.cut_id not in seen  # each cut once per interval
            seen.add(d.plan.cut_id)
    assert planner.decide(KEY, 1000).plan.kind == "local"
    offloading = {c.id for c in manifest.cuts if not c.local_only}
    assert seen == offloading


def test_forced_modes(manifest):
    link = _link(rtt_ms=1, mbps=1)
    planner = _planner(manifest, link, _table(manifest, _times(manifest)))
    d = planner.forced("cloud", None, KEY)
    assert d.plan.kind == "cloud" and d.plan.encoding == "int8" and d.reason == "mode=cloud"
    cut = next(c.id for c in manifest.cuts if c.head_part and c.tail_part)
    assert planner.forced("split", cut, KEY).plan.cut_id == cut
    local_cut = next(c.id for c in manifest.cuts if c.local_only)
    assert planner.forced("split", local_cut, KEY).plan.kind == "local"
    with pytest.raises(InvalidArgument, match="split:999 is not a plan"):
        planner.forced("split", 999, KEY)
    link.observe_connected(False)
    assert "cloud unavailable" in planner.forced("cloud", None, KEY).reason


def test_frontier_bytes_come_from_the_manifest_per_shape_when_it_can(manifest):
    calls = []

    class PerShape:
        def __init__(self, m):
            self._m = m

        def __getattr__(self, name):
            return getattr(self._m, name)

        def frontier_bytes(self, cut_id, shapes, *, encoding="raw"):
            calls.append((cut_id, dict(shapes), encoding))
            return 1000 * (cut_id + 1)

    link = _link()
    cost = CostModel(PerShape(manifest), "d" * 64, _table(manifest, _times(manifest)), link)
    big = ((1, 3, 32, 32),)
    est = cost.estimate(Plan("cloud", 0, "raw"), big)
    assert est.frontier_bytes == 1000
    assert (0, {"input": (1, 3, 32, 32)}, "raw") in calls
    # without it: the profiled size scaled by the input's elements (x4 here)
    plain = CostModel(manifest, "d" * 64, _table(manifest, _times(manifest)), link)
    cut0 = manifest.cut(0).frontier_bytes
    assert plain.estimate(Plan("cloud", 0, "raw"), big).frontier_bytes == 4 * cut0
    # device times scale the same way until measured at that shape
    assert plain.estimate(plain.plans()[0], big).total_ms == pytest.approx(40.0)
    plain.observe_local("parts/full.onnx", big, 12.0)
    assert plain.estimate(plain.plans()[0], big).total_ms == pytest.approx(12.0)


def test_new_plan_kinds_use_the_same_model(manifest):
    link = _link()
    cost = CostModel(manifest, "d" * 64, _table(manifest, _times(manifest, full=10)), link)

    def escalate(plan, sc):
        small = cost.part_ms("parts/full.onnx", sc) / 10
        return Estimate(plan, small, head_ms=small)

    cost.register_kind("answer-small", escalate)
    cost.add_plan(Plan("answer-small", 0))
    planner = Planner(cost, link, explore_interval_s=NEVER)
    assert planner.decide(KEY, 100).plan.kind == "answer-small"
    with pytest.raises(InvalidArgument):
        cost.add_plan(Plan("unknown-kind", 0))


def test_a_dynamic_hw_request_is_costed_at_its_own_shape(dynamic_hw_bundle):
    with load_bundle(dynamic_hw_bundle) as b:
        m = b.manifest
    assert any(c.frontier_dims for c in m.cuts)  # compiler v2: sizes as functions of H, W
    t = ProfileTable("d" * 64, "cpu-x86_64", {"image": (1, 3, 32, 32)})
    t.parts["parts/full.onnx"] = {"onnxruntime": PartTiming(4.0, 4.0, 10)}
    link = _link()
    cost = CostModel(m, "d" * 64, t, link)
    for h, w in ((32, 32), (64, 96), (17, 9)):
        key = ((1, 3, h, w),)
        for plan in cost.plans():
            if plan.offloads:
                est = cost.estimate(plan, key)
                assert est.frontier_bytes == m.frontier_bytes(
                    plan.cut_id, {"image": (1, 3, h, w)}, encoding=plan.encoding)
        assert cost.estimate(cost.plans()[0], key).total_ms == pytest.approx(
            4.0 * h * w / (32 * 32))


# -- learned corrections ------------------------------------------------------------------------


def _close_race(manifest):
    """A planner where cloud (8 ms expected) beats local (10 ms) by a little."""
    link = _link(rtt_ms=1, mbps=1000, cloud=_cloud_tails(manifest, 7.0),
                 digest=manifest.source_digest)
    return _planner(manifest, link, _table(manifest, _times(manifest, full=10)))


def test_a_plan_that_keeps_running_slower_than_estimated_loses_the_decision(manifest):
    planner = _close_race(manifest)
    cost = planner.cost
    first = planner.decide(KEY, 100, now_s=0.0)
    assert first.plan.kind == "cloud" and first.estimate.correction_ms == 0
    base = first.estimate.total_ms
    local = cost.estimate(planner.local_plan, KEY, now_s=0.0)
    for _ in range(3):  # local runs as estimated
        cost.observe_actual(planner.local_plan, local, local.total_ms, now_s=0.5)
    # one unlucky run does not count; two do not either (the median of at least three)
    for i in range(2):
        cost.observe_actual(first.plan, first.estimate, base + 6.0, now_s=1.0 + i)
    assert planner.decide(KEY, 100, now_s=3.0).plan == first.plan
    cost.observe_actual(first.plan, first.estimate, base + 6.0, now_s=3.0)
    corrected = cost.estimate(first.plan, KEY, now_s=3.0)
    assert corrected.correction_ms == pytest.approx(6.0)
    assert corrected.total_ms == pytest.approx(base + 6.0)
    # the other labels' estimates are untouched (a label not learnt gets the smallest learnt
    # correction, here local's 0); the other encodings of the same cut share the correction
    others = {p: cost.estimate(p, KEY, now_s=3.0) for p in cost.plans()
              if p.label != first.plan.label}
    assert all(e.correction_ms == 0 for e in others.values())
    assert all(cost.estimate(p, KEY, now_s=3.0).correction_ms == pytest.approx(6.0)
               for p in cost.plans() if p.label == first.plan.label)
    d = planner.decide(KEY, 100, now_s=3.0)
    assert d.plan != first.plan
    assert d.estimate.total_ms == min(e.total_ms for e in others.values())
    # explainable: the status lists the correction with its samples
    rows = {r["plan"]: r for r in cost.corrections()}
    assert rows[first.plan.label]["samples"] == 3
    assert rows[first.plan.label]["median_ms"] == pytest.approx(6.0)
    assert rows["local"]["median_ms"] == pytest.approx(0.0)


def test_a_plan_not_learnt_yet_gets_the_smallest_learnt_correction(manifest):
    planner = _close_race(manifest)
    cost = planner.cost
    cloud = next(p for p in cost.plans() if p.kind == "cloud")
    for plan, extra in ((planner.local_plan, 20.0), (cloud, 12.0)):
        est = cost.estimate(plan, KEY, now_s=0.0)  # cloud's: with local's 20 ms, then
        for _ in range(3):
            cost.observe_actual(plan, est, est.total_ms - est.correction_ms + extra, now_s=0.0)
    split = next(p for p in cost.plans() if p.kind == "split")
    assert cost.estimate(split, KEY, now_s=0.0).correction_ms == pytest.approx(12.0)


def test_a_correction_is_learnt_on_the_residual_not_on_itself(manifest):
    planner = _close_race(manifest)
    cost = planner.cost
    plan = planner.local_plan
    est = cost.estimate(plan, KEY, now_s=0.0)
    for i in range(5):  # every run takes 4 ms more than the terms say
        est = cost.estimate(plan, KEY, now_s=float(i))
        cost.observe_actual(plan, est, est.total_ms - est.correction_ms + 4.0, now_s=float(i))
    assert cost.estimate(plan, KEY, now_s=4.0).correction_ms == pytest.approx(4.0)
    d = planner.decide(KEY, 100, now_s=4.0)
    assert d.plan.kind == "cloud"  # 8 ms against 14 ms


def test_corrections_are_bounded_and_decay_so_a_plan_is_measured_again(manifest):
    planner = _close_race(manifest)
    cost = planner.cost
    local = planner.local_plan
    est = cost.estimate(local, KEY, now_s=0.0)  # 10 ms
    for _ in range(3):  # absurdly fast runs cannot make it look faster than 75 % of its terms
        cost.observe_actual(local, est, 0.0, now_s=0.0)
    assert cost.estimate(local, KEY, now_s=0.0).total_ms == pytest.approx(7.5)
    for _ in range(9):  # absurdly slow runs add at most 4x the estimate + 50 ms
        cost.observe_actual(local, est, 1e6, now_s=1.0)
    assert cost.estimate(local, KEY, now_s=1.0).total_ms == pytest.approx(10 + 40 + 50)
    cost.forget_corrections()
    for _ in range(3):
        cost.observe_actual(local, est, 30.0, now_s=10.0)  # +20 ms
    assert cost.estimate(local, KEY, now_s=10.0).correction_ms == pytest.approx(20.0)
    # not run for a half-life: half of it; long after: nearly nothing, so it is chosen again
    assert cost.estimate(local, KEY, now_s=40.0).correction_ms == pytest.approx(10.0)
    assert cost.estimate(local, KEY, now_s=250.0).correction_ms < 0.1
    # once it runs again, its recent runs count (old ones are dropped after a minute)
    for _ in range(3):
        cost.observe_actual(local, cost.estimate(local, KEY, now_s=250.0), 10.5, now_s=250.0)
    assert cost.estimate(local, KEY, now_s=250.0).correction_ms == pytest.approx(0.5)


def test_forced_decisions_weigh_the_corrections_of_their_encodings(manifest):
    planner = _close_race(manifest)
    cost = planner.cost
    d = planner.forced("cloud", None, KEY)
    clouds = [p for p in cost.plans() if p.kind == "cloud"]
    assert len(clouds) > 1  # one per verified encoding
    for _ in range(3):
        cost.observe_actual(d.plan, d.estimate, d.estimate.total_ms + 3.0)
    assert cost.estimate(d.plan, KEY).correction_ms == pytest.approx(3.0, abs=1e-3)
    again = planner.forced("cloud", None, KEY)  # the encoding with the lowest corrected time
    assert again.estimate.total_ms == pytest.approx(
        min(cost.estimate(p, KEY).total_ms for p in clouds))
    cost.add_plan(clouds[0])  # already there: no second entry
    assert len(cost.plans()) == len(cost._corrections)


def _sim_link(rtt_ms, mbps):
    return {"rtt_ms": rtt_ms, "bps": mbps * 1e6}


@pytest.mark.parametrize("idle_probes", [True, False])
def test_after_a_collapse_and_recovery_offloading_resumes_in_bounded_time(manifest,
                                                                          idle_probes):
    """A simulated clock and link: wifi (10 ms, 20 Mbit/s) for 20 s, 3g (100 ms, 1 Mbit/s)
    for 20 s, wifi again; 20 requests a second; the cloud computes in 5 ms, local takes 60 ms;
    an idle probe every 2 s (or none: then the planner's exploration must find the way back),
    and one at once when the daemon's link asks for it."""
    wifi, g3 = _sim_link(10.0, 20.0), _sim_link(100.0, 1.0)
    link = LinkEstimator(prior_uplink_mbps=20, prior_rtt_ms=10)
    link.observe_connected(True)
    times = _times(manifest, full=60, heads={c.id: 20.0 for c in manifest.cuts},
                   tails={c.id: 40.0 for c in manifest.cuts})
    planner = Planner(CostModel(manifest, "d" * 64, _table(manifest, times), link), link)
    t, last_offload, last_probe = 0.0, -math.inf, -math.inf
    ran: list[tuple[float, bool]] = []
    while t < 60.0:
        net = wifi if t < 20 or t >= 40 else g3
        d = planner.decide(KEY, 1000, now_s=t)
        if d.plan.offloads:
            up, down = d.estimate.frontier_bytes, 40
            network_ms = net["rtt_ms"] + (up + down) * 8000 / net["bps"]
            link.observe_offload(d.plan.cut_id, KEY, up_bytes=up, down_bytes=down,
                                 round_trip_ms=network_ms + 5.0, compute_ms=5.0, queue_ms=0.0,
                                 now_s=t)
            actual = d.estimate.head_ms + d.estimate.encode_ms + network_ms + 5.0
            last_offload = t
        else:
            actual = 60.0
        planner.cost.observe_actual(d.plan, d.estimate, actual, now_s=t)
        ran.append((t, d.plan.offloads))
        if link.probe_wanted or (idle_probes and t - last_offload >= 2.0 and
                                 t - last_probe >= 2.0):
            link.observe_probe(net["rtt_ms"], now_s=t)
            last_probe = t
        t = round(t + 0.05, 3)

    def settled(since, offloading):  # the first of 5 requests in a row that do
        run = [r for r in ran if r[0] >= since]
        for i in range(len(run) - 4):
            if all(o == offloading for _, o in run[i:i + 5]):
                return run[i][0] - since
        return math.inf

    assert settled(0.0, True) < 0.5
    assert settled(20.0, False) < 1.0  # the collapse: local at once
    # the recovery: the next idle probe (every 2 s), else the next exploring offload (each cut
    # is tried every 10 s)
    assert settled(40.0, True) <= (2.5 if idle_probes else 10.5)
    assert link.rtt_ms == pytest.approx(10.0, rel=0.2)
