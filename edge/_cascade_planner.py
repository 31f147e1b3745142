"""Cascades on the edge: the small model answers here, the large model in the cloud takes the
inputs the escalation rule sends on (a cascade bundle: ``protocol/bundle/BUNDLE.md``, *Cascades*).

With a cascade bundle the daemon also loads the small model (and the rule's ONNX scorer, if
any) beside the large model's parts (whose heads an escalation split at a cut runs). Two more
plan kinds join the cost model (:meth:`CostModel.register_kind`), costed by the same terms:

* ``small`` (label ``small``): answer locally, ``T = small``;
* ``escalate`` at cut ``k`` (labels ``escalate:cloud`` and ``escalate:split:<k>``), one per
  offloading plan of the large model: ``T = small + head_k + encode_k + bytes_k / uplink + rtt
  + queue + tail_k + reply``; its fallback is the small model's answer, already computed, so
  its fallback time is ``small + head_k + encode_k``.

A request (``mode=cascade``, or ``auto`` on a cascade bundle) runs the small model first; the
rule (max-softmax, margin, entropy or the scorer; the threshold from the manifest) scores each
row. No row escalates: the small model's answer (``ran=local``). Otherwise the escalation plan
with the lowest expected time for the escalated rows is chosen; when the cloud is unavailable,
or even that plan is not expected to finish before the deadline, the request is answered
locally and says so (``escalation=skipped``, ``reason``). An escalation sends only the
escalated rows when every input and output has the same open leading (batch) dim, the whole
request otherwise; the cloud's rows replace the small model's. An escalation that fails (a
timeout: its budget is the time left before the deadline less ``deadline_margin_ms``, the cloud
stalled or unreachable, an error, an answer that does not fit) is answered with the small
model's answer (``ran=fallback``) within the deadline.

The answer's parameters add ``escalated`` (the rule sent the request on), ``escalation``
(``none`` | ``cloud`` | ``skipped`` | ``failed``), ``score`` (the small model's score of its
least sure row), ``threshold``, ``rule``, ``rows`` and ``escalated_rows``; and when the cloud
answered, ``agreed_rows``: on how many escalated rows the small and large models' top-1 agree.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from tandem.edge._offload import send_to_cloud
from tandem.edge._planner import CostModel, Decision, Estimate, Plan
from tandem.edge._requests import Answer, RequestOptions
from tandem.edge._runtime import PartRunner
from tandem.protocol.dtypes import LOSSY_ENCODINGS
from tandem.protocol.errors import (
    InvalidArgument,
    TandemError,
)
from tandem.protocol.tensors import Encoding, Tensor

__all__ = ["CascadePlanner"]

log = logging.getLogger("tandem.edge.cascade")

_ENCODING = {"raw": Encoding.RAW, **LOSSY_ENCODINGS}
SMALL = "small"
ESCALATE = "escalate"


class CascadePlanner:
    """The cascade of one loaded bundle (module docstring). Make it with :meth:`load`
    (blocking); :meth:`infer` answers a request on the daemon's loop."""

    def __init__(self, bundle: Any, runtime: Any, cost: CostModel, small: PartRunner,
                 scorer: PartRunner | None) -> None:
        cascade = bundle.manifest.cascade
        if cascade is None:
            raise InvalidArgument(f"bundle {bundle.manifest.model_name!r} is not a cascade")
        self.cascade = cascade
        self.rule = cascade.rule
        self.runtime = runtime
        self.cost = cost
        self.small = small
        self.scorer = scorer
        manifest = bundle.manifest
        self._large_of = {s: large for large, s in cascade.output_map.items()}
        self.answer_output = self._large_of[self.rule.output]  # top-1 is the answer
        leading = {t.shape[0] if t.shape else None for t in (*manifest.inputs, *manifest.outputs)}
        self.row_split = len(leading) == 1 and isinstance(next(iter(leading)), str)
        self.small_plan = Plan(SMALL, runtime.local_cut.id)
        cost.register_kind(SMALL, self._estimate_small)
        cost.register_kind(ESCALATE, self._estimate_escalate)
        cost.add_plan(self.small_plan)
        self.escalations: list[Plan] = []
        for plan in cost.plans():
            if plan.offloads:
                esc = Plan(ESCALATE, plan.cut_id, plan.encoding)
                cost.add_plan(esc)
                self.escalations.append(esc)
        # counters since load (the metrics keep the daemon's totals)
        self.requests = 0
        self.escalated = 0
        self.agreed_rows = 0
        self.compared_rows = 0

    @classmethod
    def load(cls, bundle: Any, runtime: Any, cost: CostModel, table: Any, *,
             intra_op_threads: int = 0, warmup: int = 3, runs: int = 20) -> CascadePlanner:
        """Load the small model (and the scorer) on ONNX Runtime, time the small model at the
        profile shapes (into ``table``, for the cost model), and register the plan kinds."""
        from tandem.devices.backends import OnnxRuntimeBackend
        from tandem.edge._profiler import _time_ms, sample_inputs

        selection = bundle.select(("small", "scorer"), "onnxruntime")
        runners: list[PartRunner] = []
        try:
            for r in (selection.small, selection.scorer):
                if r is None:
                    continue
                backend = OnnxRuntimeBackend(r.path, intra_op_threads=intra_op_threads or None,
                                             optimized=r.optimized, name=r.part).activate()
                runners.append(PartRunner(r.part, backend, "onnxruntime"))
            small = runners[0]
            scorer = runners[1] if len(runners) > 1 else None
            feeds = sample_inputs(bundle.manifest, table.shapes)
            timing, _ = _time_ms(lambda: small.infer(feeds), warmup, max(1, runs))
            table.parts.setdefault(small.path, {})[small.kind] = timing
            return cls(bundle, runtime, cost, small, scorer)
        except BaseException:
            for runner in runners:
                runner.close()
            raise

    def close(self) -> None:
        for runner in (self.small, self.scorer):
            if runner is not None:
                runner.close()

    # -- costs ----------------------------------------------------------------------------------

    def _estimate_small(self, plan: Plan, sc: Any) -> Estimate:
        ms = self.cost.part_ms(self.small.path, sc)
        return Estimate(plan, ms, head_ms=ms)

    def _estimate_escalate(self, plan: Plan, sc: Any) -> Estimate:
        small_ms = self.cost.part_ms(self.small.path, sc)
        t = self.cost._offload_terms(plan, sc, time.monotonic())
        return Estimate(plan, small_ms + t[0], head_ms=small_ms + t[1], encode_ms=t[2],
                        uplink_ms=t[3], rtt_ms=t[4], queue_ms=t[5], tail_ms=t[6], reply_ms=t[7],
                        local_tail_ms=0.0, frontier_bytes=t[9], tail_measured=t[10])

    def choose_escalation(self, key: Any) -> tuple[Plan, Estimate] | None:
        """The escalation plan with the lowest expected time for inputs of shape ``key``."""
        best: tuple[Plan, Estimate] | None = None
        for plan in self.escalations:
            est = self.cost.estimate(plan, key)
            if best is None or est.total_ms < best[1].total_ms:
                best = (plan, est)
        return best

    # -- the small model ------------------------------------------------------------------------

    def run_small(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                                 np.ndarray, float]:
        """(outputs under the large model's names, one score per row, ms). Blocking."""
        t0 = time.perf_counter()
        out = self.small.infer({n: feeds[n] for n in self.small.input_names})
        if self.scorer is not None:
            got = self.scorer.infer({n: out[n] if n in out else feeds[n]
                                     for n in self.scorer.input_names})
            scores = np.asarray(next(iter(got.values())), np.float64).reshape(-1)
        else:
            scores = np.asarray(self.rule.scores(out), np.float64).reshape(-1)
        ms = (time.perf_counter() - t0) * 1e3
        answer = {large: out[small] for large, small in self.cascade.output_map.items()}
        return answer, scores, ms

    def _least_sure(self, scores: np.ndarray) -> float:
        if not scores.size:
            return float("nan")
        if np.isnan(scores).any():
            return float("nan")
        return float(scores.max() if self.rule.escalate_above else scores.min())

    # -- a request ------------------------------------------------------------------------------

    async def infer(self, daemon: Any, model: Any, feeds: dict[str, np.ndarray],
                    options: RequestOptions, started: float) -> Answer:
        """Answer one request through the cascade (module docstring)."""
        cfg = daemon.config
        metrics = daemon.metrics
        deadline = started + options.deadline_ms / 1000
        model.acquire()
        label = SMALL
        try:
            key = self.runtime.check_inputs(feeds)
            small_out, scores, small_ms = await daemon.pool.run(
                lambda: self.run_small(feeds), options.priority)
            self.cost.observe_local(self.small.path, key, small_ms)
            rows = int(scores.shape[0])
            mask = self.rule.escalates(scores)
            if mask.shape[0] != rows:
                raise InvalidArgument("the escalation rule gave one score per row of "
                                      f"{mask.shape[0]} rows, the small model answered {rows}")
            n_esc = int(mask.sum())
            escalated = n_esc > 0
            params: dict[str, Any] = {
                "escalated": escalated, "score": round(self._least_sure(scores), 6),
                "threshold": self.rule.threshold, "rule": self.rule.kind, "rows": rows,
                "escalated_rows": n_esc, "small_ms": round(small_ms, 3)}
            outputs = small_out
            ran, path, reason = "local", "small", "the small model is sure enough"
            expected_ms = self.cost.estimate(self.small_plan, key).total_ms
            fallback_reason = None
            decide_s = 0.0
            if escalated:
                sub = self.row_split and n_esc < rows
                esc_feeds = {n: a[mask] for n, a in feeds.items()} if sub else feeds
                esc_key = self.runtime.check_inputs(esc_feeds) if sub else key
                t_decide = time.perf_counter()
                choice = self.choose_escalation(esc_key)
                decide_s = time.perf_counter() - t_decide
                left_ms = (deadline - time.monotonic()) * 1e3 - cfg.deadline_margin_ms
                if choice is None:
                    path, reason = "skipped", "this bundle has no escalation plan"
                    params["escalation"] = "skipped"
                elif not daemon.link.available:
                    label = choice[0].label
                    path, reason = "skipped", "cloud unavailable: answered locally"
                    params["escalation"] = "skipped"
                else:
                    plan, est = choice
                    label = plan.label
                    need_ms = est.total_ms - self.cost.part_ms(
                        self.small.path, self.cost.shape_costs(esc_key))
                    if need_ms > left_ms:
                        path = "skipped"
                        reason = (f"escalation ({label}) expected {need_ms:.1f} ms, "
                                  f"{max(0.0, left_ms):.1f} ms left before the deadline: "
                                  "answered locally")
                        params["escalation"] = "skipped"
                    else:
                        expected_ms = est.total_ms
                        params.update(cut_id=plan.cut_id, encoding=plan.encoding)
                        got, info = await self._escalate(
                            daemon, model, Decision(plan, est, "cascade"), esc_feeds, esc_key,
                            deadline, options.priority)
                        params.update(info)
                        if got is None:
                            ran, path = "fallback", "fallback"
                            fallback_reason = info.get("fallback_reason", "error")
                            reason = (f"escalation ({label}) failed ({fallback_reason}): "
                                      "answered with the small model")
                            params["escalation"] = "failed"
                        merged = None if got is None else \
                            self._merge(small_out, got, mask if sub else None)
                        if got is not None and merged is None:
                            ran, path, fallback_reason = "fallback", "fallback", "error"
                            reason = (f"escalation ({label}) answered rows that do not fit: "
                                      "answered with the small model")
                            params["escalation"] = "failed"
                        elif got is not None and merged is not None:
                            ran, path = "cloud", "escalated"
                            reason = f"escalated to the large model ({label})"
                            params["escalation"] = "cloud"
                            outputs = merged
                            # agreement over the escalated rows only, also when the whole
                            # request went (the large model then answered every row)
                            agree = self._agreement(small_out, got, mask, sent_rows_only=sub)
                            params["agreed_rows"] = agree
                            self.agreed_rows += agree
                            self.compared_rows += n_esc
                            if metrics is not None:
                                metrics.agreement(agree, n_esc - agree)
            else:
                params["escalation"] = "none"
            if path == "skipped":
                label = SMALL
        except TandemError:
            if metrics is not None:
                metrics.failed(label, "local")
            raise
        finally:
            model.release()
        self.requests += 1
        self.escalated += escalated
        if metrics is not None:
            metrics.decided(label, decide_s)
        actual_ms = (time.monotonic() - started) * 1e3
        parameters = {
            "plan": label, "ran": ran, "mode": "cascade", "expected_ms": round(expected_ms, 3),
            "actual_ms": round(actual_ms, 3), "deadline_ms": options.deadline_ms,
            "deadline_met": actual_ms <= options.deadline_ms, "reason": reason,
            "fallback": ran == "fallback", "bundle": model.digest[:16], **params}
        if fallback_reason is not None:
            parameters["fallback_reason"] = fallback_reason
        daemon.record_answer(label, ran, actual_ms, fallback_reason, escalated=escalated,
                             path=path)
        m = model.bundle.manifest
        return Answer(outputs, parameters, m.model_name, m.model_version)

    def _merge(self, small: dict[str, np.ndarray], large: dict[str, np.ndarray],
               mask: np.ndarray | None) -> dict[str, np.ndarray] | None:
        """The small model's answer with the escalated rows replaced by the large model's
        (all of it when ``mask`` is None); None when the cloud's rows do not fit."""
        if mask is None:
            return large
        out = {}
        rows = int(mask.sum())
        for name, arr in small.items():
            got = np.asarray(large[name])
            if arr.shape[:1] != mask.shape or got.shape != (rows, *arr.shape[1:]):
                log.warning("the cloud answered %s with shape %s for %d escalated rows of %s",
                            name, list(got.shape), rows, list(arr.shape))
                return None
            merged = np.array(arr, copy=True)
            merged[mask] = got.astype(arr.dtype, copy=False)
            out[name] = merged
        return out

    def _agreement(self, small: dict[str, np.ndarray], large: dict[str, np.ndarray],
                   mask: np.ndarray, sent_rows_only: bool) -> int:
        """How many escalated rows (``mask``) get the same top-1 class from both models;
        ``large`` holds the escalated rows only, or (``sent_rows_only`` False) every row."""
        s = np.asarray(small[self.answer_output])[mask]
        lg = np.asarray(large[self.answer_output])
        if not sent_rows_only:
            if lg.shape[:1] != mask.shape:
                return 0
            lg = lg[mask]
        if s.ndim != 2 or lg.shape != s.shape:
            return 0
        return int((s.argmax(axis=1) == lg.argmax(axis=1)).sum())

    async def _escalate(self, daemon: Any, model: Any, decision: Decision,
                        feeds: dict[str, np.ndarray], key: Any, deadline: float,
                        priority: int) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
        """Run the large model for ``feeds`` through ``decision``'s cut (its head here for a
        split, the rest in the cloud). ``(outputs, info)``, or ``(None, info)`` with
        ``info["fallback_reason"]`` when the cloud did not answer in time or usefully."""
        plan = decision.plan
        cut_id = plan.cut_id
        runtime, cost = self.runtime, self.cost
        encoding = _ENCODING[plan.encoding]
        head = runtime.head(cut_id)

        def run_head() -> tuple[tuple[Tensor, ...], float]:
            t0 = time.perf_counter()
            frontier = runtime.run_head(cut_id, feeds)
            tensors = tuple(Tensor.from_array(n, a, encoding if a.dtype == np.float32 else
                                              Encoding.RAW) for n, a in frontier.items())
            return tensors, (time.perf_counter() - t0) * 1e3

        tensors, head_ms = await daemon.pool.run(run_head, priority)
        if head is not None:
            cost.observe_local(head.path, key, head_ms)
        info: dict[str, Any] = {"head_ms": round(head_ms, 3)}
        budget_ms = (deadline - time.monotonic()) * 1e3 - daemon.config.deadline_margin_ms
        outputs, response, reason, waited_ms = await send_to_cloud(
            daemon, model, cost, cut_id, key, tensors, budget_ms, priority, what="escalation")
        if waited_ms is not None:
            info["cloud_ms"] = round(waited_ms, 3)
        if reason is not None or response is None:
            return None, {**info, "fallback_reason": reason}
        info.update(cloud_compute_ms=round(response.timings.compute_ms, 3),
                    cloud_queue_ms=round(response.timings.queue_ms, 3),
                    worker_id=response.worker_id, sent_bytes=sum(t.nbytes for t in tensors))
        return outputs, info

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        cal = self.cascade.calibration
        out: dict[str, Any] = {
            "small_part": self.small.path, "rule": self.rule.kind,
            "threshold": self.rule.threshold, "output": self.rule.output,
            "scorer": self.scorer.path if self.scorer is not None else None,
            "row_split": self.row_split, "requests": self.requests,
            "escalated": self.escalated,
            "escalation_ratio": round(self.escalated / self.requests, 4) if self.requests
            else 0.0,
            "agreement": round(self.agreed_rows / self.compared_rows, 4)
            if self.compared_rows else None}
        if cal is not None:
            out["calibrated"] = {"target": cal.target, "target_value": cal.target_value,
                                 "escalation_rate": cal.chosen.escalation_rate,
                                 "agreement": cal.chosen.agreement, "samples": cal.samples}
        return out
