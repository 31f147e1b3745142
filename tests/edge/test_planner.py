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
