"""The split planner: per request, the plan with the lowest expected latency that meets the
deadline, from a cost model fed by measurements.

Plans (:class:`Plan`): ``local`` (the full model here), ``cloud`` (cut 0: the raw input goes to
the cloud) and ``split:<k>`` (head of cut ``k`` here, its frontier to the cloud, the tail there),
each offloading plan once per frontier encoding the compiler verified for its cut (raw always).
The plan set and the cost of a plan kind are open: :meth:`CostModel.add_plan` and
:meth:`CostModel.register_kind` let a new kind of plan (a cascade's "answer locally" and
"escalate", for instance) be costed by the same model and chosen by the same planner.

Cost model (docs/architecture.md, "Data flow"), for an offloading plan at cut ``k``::

    T(k) = head_k + encode_k + bytes_k / uplink + rtt + queue + tail_k + reply / downlink

* ``head_k``: this device's time for the head, measured per input shape while serving, else the
  profiled time scaled by the input's element count against the profile shapes;
* ``encode_k``, ``bytes_k``: the frontier's encode time and size in the plan's encoding at the
  request's input shape (:meth:`CostModel.frontier_bytes`, the one place frontier sizes are
  computed: the manifest's own per-shape figure when the bundle has one, else the profiled size
  scaled by the input's element count);
* ``uplink``/``rtt``/``queue``/``tail_k``: from :class:`~tandem.edge._link.LinkEstimator`; an
  unmeasured tail is the local tail divided by ``cloud_speedup`` (a prior, reported as such);
* ``reply``: the outputs' size at this input shape.

Local: ``T = full`` (measured the same way as a head). An offloading plan also has a
*fallback time*, ``head_k + encode_k + local tail_k``: what it costs when the cloud fails and the
daemon finishes from the frontier.

Choice (:meth:`Planner.decide`): among plans whose fallback time fits the deadline (or any
plan, when even the local plan does not), the lowest expected ``T``; the plan in use for this
input shape is kept unless the best is better by more than ``hysteresis``. With the cloud
unreachable only ``local`` is considered. A plan whose cloud tail has not been measured for
``explore_interval_s`` is tried once in a while (when it is safe and its expected time meets
the deadline) so priors are replaced by measurements.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from tandem.edge._link import Ewma, LinkEstimator
from tandem.protocol.errors import InvalidArgument, TandemError

__all__ = ["CostModel", "Decision", "Estimate", "Plan", "Planner"]

_MAX_SHAPES = 256
_ENCODING_FACTOR = {"raw": 1.0, "fp16": 0.5, "int8": 0.25}


@dataclass(frozen=True, slots=True)
class Plan:
    """Where a request runs. ``kind``: ``local`` | ``cloud`` | ``split`` (or a registered
    kind); ``cut_id``: the cut whose frontier is offloaded (the all-local cut for ``local``);
    ``encoding``: the frontier's encoding on the wire (``raw`` | ``fp16`` | ``int8``)."""

    kind: str
    cut_id: int
    encoding: str = "raw"

    @property
    def label(self) -> str:
        if self.kind == "split":
            return f"split:{self.cut_id}"
        if self.kind == "escalate":  # a cascade's (tandem.edge._cascade_planner); cut 0: cloud
            return "escalate:cloud" if self.cut_id == 0 else f"escalate:split:{self.cut_id}"
        return self.kind

    @property
    def offloads(self) -> bool:
        return self.kind in ("cloud", "split")


@dataclass(frozen=True, slots=True)
class Estimate:
    """The cost model's terms for one plan at one input shape (milliseconds)."""

    plan: Plan
    total_ms: float
    head_ms: float = 0.0
    encode_ms: float = 0.0
    uplink_ms: float = 0.0
    rtt_ms: float = 0.0
    queue_ms: float = 0.0
    tail_ms: float = 0.0
    reply_ms: float = 0.0
    local_tail_ms: float = 0.0  # finishing locally from the frontier
    frontier_bytes: int = 0
    tail_measured: bool = True

    @property
    def fallback_ms(self) -> float:
        return self.head_ms + self.encode_ms + self.local_tail_ms

    def terms(self) -> dict[str, float]:
        return {k: round(getattr(self, k), 3) for k in (
            "head_ms", "encode_ms", "uplink_ms", "rtt_ms", "queue_ms", "tail_ms", "reply_ms")}


@dataclass(frozen=True, slots=True)
class Decision:
    plan: Plan
    estimate: Estimate
    reason: str
    exploring: bool = False


class _ShapeCosts:
    """What does not change between requests of one input shape."""

    __slots__ = ("base_ms", "bytes", "encode_ms", "key", "ratio", "reply_bytes", "shapes")

    def __init__(self, key: Hashable, shapes: dict[str, tuple[int, ...]], ratio: float) -> None:
        self.key = key
        self.shapes = shapes
        self.ratio = ratio
        self.bytes: dict[tuple[int, str], int] = {}
        self.encode_ms: dict[tuple[int, str], float] = {}
        self.reply_bytes = 0
        self.base_ms: dict[str, float] = {}  # part -> profiled time scaled to this shape


class CostModel:
    """Expected latency of every plan of one bundle on this device (module docstring).

    ``manifest``/``digest``: the bundle's; ``table``: its
    :class:`~tandem.edge._profiler.ProfileTable`; ``kinds``: part path -> the backend kind
    serving it now (a mapping read on every estimate, so a switch to TensorRT counts at once);
    ``link``: the :class:`~tandem.edge._link.LinkEstimator`."""

    def __init__(self, manifest: Any, digest: str, table: Any, link: LinkEstimator, *,
                 kinds: Mapping[str, Any] | None = None, cloud_speedup: float = 1.0) -> None:
        self.manifest = manifest
        self.digest = digest
        self.model_digest = manifest.source_digest
        self.table = table
        self.link = link
        self.kinds = kinds or {}
        self.cloud_speedup = cloud_speedup
        self._input_names = [t.name for t in manifest.inputs]
        self._local: dict[tuple[str, Hashable], Ewma] = {}
        self._shapes: OrderedDict[Hashable, _ShapeCosts] = OrderedDict()
        self._kinds: dict[str, Callable[[Plan, _ShapeCosts], Estimate]] = {
            "local": self._estimate_local, "cloud": self._estimate_offload,
            "split": self._estimate_offload}
        cuts = sorted(manifest.cuts, key=lambda c: c.id)
        self.local_cut = next(c for c in cuts if c.local_only)
        self.cuts = {c.id: c for c in cuts}
        self._plans: list[Plan] = [Plan("local", self.local_cut.id)]
        for cut in cuts:
            if cut.local_only or not cut.verification.passed:
                continue
            kind = "cloud" if cut.cloud_only else "split"
            for enc in dict.fromkeys(("raw", *manifest.allowed_encodings(cut.id))):
                self._plans.append(Plan(kind, cut.id, enc))

    # -- the plan set (open to new kinds) -------------------------------------------------------

    def plans(self) -> tuple[Plan, ...]:
        return tuple(self._plans)

    def add_plan(self, plan: Plan) -> None:
        """Offer another plan (its kind must be registered)."""
        if plan.kind not in self._kinds:
            raise InvalidArgument(f"no cost function for plan kind {plan.kind!r}")
        if plan not in self._plans:
            self._plans.append(plan)

    def register_kind(self, kind: str, estimate: Callable[[Plan, Any], Estimate]) -> None:
        """Cost plans of ``kind`` with ``estimate(plan, shape_costs)``; ``shape_costs`` has
        ``key``, ``shapes`` (input name -> shape) and ``ratio`` (input elements against the
        profile shapes), and :meth:`part_ms` / :meth:`frontier_bytes` give the shared terms."""
        self._kinds[kind] = estimate

    # -- the terms ------------------------------------------------------------------------------

    def shape_costs(self, key: tuple[tuple[int, ...], ...]) -> _ShapeCosts:
        sc = self._shapes.get(key)
        if sc is not None:
            self._shapes.move_to_end(key)
            return sc
        shapes = dict(zip(self._input_names, key, strict=True))
        elements = sum(math.prod(s) for s in key)
        ratio = elements / max(1, self.table.input_elements)
        sc = _ShapeCosts(key, shapes, ratio)
        for plan in self._plans:
            if plan.offloads:
                k = (plan.cut_id, plan.encoding)
                sc.bytes[k] = self.frontier_bytes(plan.cut_id, shapes, ratio, plan.encoding)
                enc_ms = self.table.encode_ms.get(plan.cut_id, {}).get(plan.encoding, 0.0)
                sc.encode_ms[k] = enc_ms * ratio
        sc.reply_bytes = int(self.table.output_bytes * (
            1.0 if all(isinstance(d, int) for t in self.manifest.outputs for d in t.shape)
            else ratio))
        self._shapes[key] = sc
        if len(self._shapes) > _MAX_SHAPES:
            self._shapes.popitem(last=False)
        return sc

    def frontier_bytes(self, cut_id: int, shapes: dict[str, tuple[int, ...]], ratio: float,
                       encoding: str) -> int:
        """Bytes of cut ``cut_id``'s frontier in ``encoding`` for inputs of ``shapes``: the
        one place the planner sizes a frontier. The manifest's own per-shape figure
        (``Manifest.frontier_bytes``, compiler v2) when the bundle has it, else the size the
        profiler measured scaled by ``ratio``."""
        per_shape = getattr(self.manifest, "frontier_bytes", None)
        if callable(per_shape):
            try:
                return int(per_shape(cut_id, shapes, encoding=encoding))
            except TandemError:
                pass
        measured = self.table.frontier_bytes.get(cut_id, {})
        if encoding in measured:
            return int(measured[encoding] * ratio)
        raw = measured.get("raw", self.cuts[cut_id].frontier_bytes)
        return int(raw * ratio * _ENCODING_FACTOR.get(encoding, 1.0))

    def part_ms(self, part: str | None, sc: _ShapeCosts) -> float:
        """This device's time for ``part`` at the shape of ``sc``: measured while serving
        (per shape), else profiled and scaled."""
        if part is None:
            return 0.0
        e = self._local.get((part, sc.key))
        if e is not None:
            return e.value  # type: ignore[return-value]
        ms = sc.base_ms.get(part)
        if ms is None:
            runner = self.kinds.get(part)
            base = self.table.part_ms(part, getattr(runner, "kind", "onnxruntime"))
            ms = sc.base_ms[part] = 0.0 if base is None else base * sc.ratio
        return ms

    def observe_local(self, part: str, key: Hashable, ms: float) -> None:
        """A part ran here in ``ms`` for inputs of shape key ``key``."""
        e = self._local.get((part, key))
        if e is None:
            if len(self._local) > 16 * _MAX_SHAPES:
                self._local.pop(next(iter(self._local)))
            e = self._local[(part, key)] = Ewma(self.link.alpha)
        e.add(ms)

    def forget_part(self, part: str) -> None:
        """Drop what was measured for ``part`` (its backend changed). Safe from any thread:
        the table is replaced, not edited (a sample landing meanwhile is lost, harmlessly)."""
        self._local = {k: v for k, v in list(self._local.items()) if k[0] != part}
        self._shapes = OrderedDict()  # profiled times per shape are computed again

    # -- estimates ------------------------------------------------------------------------------

    def estimate(self, plan: Plan, key: tuple[tuple[int, ...], ...]) -> Estimate:
        return self._kinds[plan.kind](plan, self.shape_costs(key))

    def _estimate_local(self, plan: Plan, sc: _ShapeCosts) -> Estimate:
        ms = self.part_ms(self.local_cut.head_part, sc)
        return Estimate(plan, ms, head_ms=ms)

    def _cut_terms(self, cut_id: int, sc: _ShapeCosts, now_s: float) -> tuple:
        """(head, local tail, cloud tail, measured) of one cut at one shape."""
        cut = self.cuts[cut_id]
        head = self.part_ms(cut.head_part, sc)
        local_tail = self.part_ms(cut.tail_part if cut.head_part else
                                  self.local_cut.head_part, sc)
        tail = self.link.cloud_tail_ms(self.model_digest, cut_id, sc.key, now_s)
        if tail is None:
            return head, local_tail, local_tail / self.cloud_speedup, False
        return head, local_tail, tail, True

    def _offload_terms(self, plan: Plan, sc: _ShapeCosts, now_s: float,
                       cut_terms: tuple | None = None) -> tuple:
        """(total, head, encode, uplink, rtt, queue, tail, reply, local tail, bytes, measured):
        the offload cost as plain numbers (the planner's fast path)."""
        head, local_tail, tail, measured = cut_terms or self._cut_terms(plan.cut_id, sc, now_s)
        link = self.link
        k = (plan.cut_id, plan.encoding)
        nbytes = sc.bytes[k]
        bps = link.uplink_bps
        up = nbytes * 8000.0 / bps
        reply = sc.reply_bytes * 8000.0 / bps
        rtt, queue, enc = link.rtt_ms, link.queue_ms, sc.encode_ms[k]
        return (head + enc + up + rtt + queue + tail + reply, head, enc, up, rtt, queue, tail,
                reply, local_tail, nbytes, measured)

    def _estimate_offload(self, plan: Plan, sc: _ShapeCosts) -> Estimate:
        return Estimate(plan, *self._offload_terms(plan, sc, time.monotonic()))


class Planner:
    """Chooses a :class:`Plan` per request (module docstring). Decisions take microseconds:
    the terms that depend only on the input shape are computed once per shape."""

    def __init__(self, cost: CostModel, link: LinkEstimator, *, hysteresis: float = 0.1,
                 explore_interval_s: float = 10.0) -> None:
        self.cost = cost
        self.link = link
        self.hysteresis = hysteresis
        self.explore_interval_s = explore_interval_s
        self._current: OrderedDict[Hashable, Plan] = OrderedDict()
        self._explored: dict[int, float] = {}
        self.local_plan = next(p for p in cost.plans() if p.kind == "local")

    def forced(self, mode: str, cut_id: int | None,
               key: tuple[tuple[int, ...], ...]) -> Decision:
        """The plan ``mode`` (local | cloud | split with ``cut_id``) names, in the encoding with
        the lowest expected time; InvalidArgument when the bundle has no such plan."""
        cost = self.cost
        if mode == "local" or (mode == "split" and cut_id == cost.local_cut.id):
            plan = self.local_plan
            return Decision(plan, cost.estimate(plan, key), f"mode={mode}")
        if mode == "cloud":
            plans = [p for p in cost.plans() if p.kind == "cloud"]
            if not plans:
                raise InvalidArgument("this bundle has no cloud-only plan (no cut 0)")
        else:
            plans = [p for p in cost.plans() if p.offloads and p.cut_id == cut_id]
            if not plans:
                known = sorted({p.cut_id for p in cost.plans()})
                raise InvalidArgument(f"split:{cut_id} is not a plan of this bundle "
                                      f"(cuts: {', '.join(map(str, known))})")
        best = min((cost.estimate(p, key) for p in plans), key=lambda e: e.total_ms)
        label = "cloud" if mode == "cloud" else f"split:{cut_id}"
        reason = f"mode={label}"
        if not self.link.available:
            reason += " (cloud unavailable: it finishes locally if the cloud does not answer)"
        return Decision(best.plan, best, reason)

    def decide(self, key: tuple[tuple[int, ...], ...], deadline_ms: float) -> Decision:
        """The plan for a request with input shapes ``key`` and ``deadline_ms`` (mode auto)."""
        cost = self.cost
        local = cost.estimate(self.local_plan, key)
        link = self.link
        if not link.available:
            why = "not connected" if not link.connected else "degraded"
            return Decision(self.local_plan, local, f"cloud unavailable ({why}): local")
        sc = cost.shape_costs(key)
        local_ms = local.total_ms
        limit = deadline_ms if deadline_ms > local_ms else local_ms
        now = time.monotonic()
        interval = self.explore_interval_s
        samples, explored = link.last_cut_sample_s, self._explored
        offload_terms, cut_terms, kinds = cost._offload_terms, cost._cut_terms, cost._kinds
        per_cut: dict[int, tuple] = {}
        best_plan, best_ms = self.local_plan, local_ms
        totals: dict[Plan, float] = {self.local_plan: local_ms}
        explore: Plan | None = None
        explore_ms = math.inf
        for plan in cost._plans:
            kind = plan.kind
            if kind == "local":
                continue
            if kind == "cloud" or kind == "split":
                ct = per_cut.get(plan.cut_id)
                if ct is None:
                    ct = per_cut[plan.cut_id] = cut_terms(plan.cut_id, sc, now)
                terms = offload_terms(plan, sc, now, ct)
                total = terms[0]
                fallback = terms[1] + terms[2] + terms[8]
            else:
                est = kinds[kind](plan, sc)
                total, fallback = est.total_ms, est.fallback_ms
            totals[plan] = total
            if fallback > limit:
                continue  # a failed offload could not finish locally in time
            if total < best_ms:
                best_plan, best_ms = plan, total
            if total <= deadline_ms and total < explore_ms and plan.offloads and \
                    now - samples.get(plan.cut_id, -math.inf) > interval and \
                    now - explored.get(plan.cut_id, -math.inf) > interval:
                explore, explore_ms = plan, total
        chosen, chosen_ms, reason = best_plan, best_ms, ""
        current = self._current.get(key)
        if current is not None and current != best_plan and current in totals:
            kept_ms = totals[current]
            if kept_ms <= best_ms * (1 + self.hysteresis) and (
                    current.kind == "local" or self._fallback_ms(current, sc) <= limit):
                chosen, chosen_ms = current, kept_ms
                reason = (f"kept {current.label} ({kept_ms:.2f} ms): within "
                          f"{self.hysteresis:.0%} of {best_plan.label} ({best_ms:.2f} ms)")
        if explore is not None and explore.cut_id != chosen.cut_id:
            explored[explore.cut_id] = now
            return Decision(explore, cost.estimate(explore, key),
                            f"exploring {explore.label}: its cloud time was not measured "
                            f"in the last {interval:g} s", exploring=True)
        if not reason:
            if chosen.kind == "local":
                reason = f"local ({local_ms:.2f} ms) is the fastest expected"
            else:
                reason = f"lowest expected latency ({chosen_ms:.2f} ms, local {local_ms:.2f} ms)"
            if chosen_ms > deadline_ms:
                reason += f"; no plan is expected to meet the {deadline_ms:g} ms deadline"
        self._current[key] = chosen
        if len(self._current) > _MAX_SHAPES:
            self._current.popitem(last=False)
        estimate = local if chosen is self.local_plan else cost.estimate(chosen, key)
        return Decision(chosen, estimate, reason)

    def _fallback_ms(self, plan: Plan, sc: _ShapeCosts) -> float:
        return self.cost._kinds[plan.kind](plan, sc).fallback_ms
