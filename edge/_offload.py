"""Offload with fallback from the split point.

The head runs here (cut 0: none); the frontier is encoded in the plan's encoding (float32
tensors only) and sent as an InferenceRequest with a budget of *deadline - now - local tail time
- deadline_margin_ms*. On a timeout, UNAVAILABLE, RESOURCE_EXHAUSTED, a lost connection,
NOT_FOUND / FAILED_PRECONDITION (the cloud does not run this bundle), an answer that does not fit
the model, or any other error, the tail runs here **from the frontier already computed** (the
head never runs twice). A cloud answer that arrives after that is dropped by the transport (it
waits for nobody). Every outcome updates the link estimates and the cost model.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from tandem.edge._planner import Decision
from tandem.edge._serving import ServingModel
from tandem.protocol import topics
from tandem.protocol.dtypes import LOSSY_ENCODINGS
from tandem.protocol.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TandemError,
    Unavailable,
)
from tandem.protocol.messages import InferenceRequest, InferenceResponse, new_request_id
from tandem.protocol.tensors import Encoding, Tensor

__all__ = ["cloud_outputs", "offload", "send_to_cloud"]

log = logging.getLogger("tandem.edge")

_ENCODING = {"raw": Encoding.RAW, **LOSSY_ENCODINGS}


async def offload(daemon: Any, model: ServingModel, decision: Decision,
                  feeds: dict[str, np.ndarray], key: Any, deadline: float,
                  priority: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run an offloading plan (``cloud`` or ``split``) for ``daemon`` (module docstring)."""
    plan, est = decision.plan, decision.estimate
    runtime, cost = model.runtime, model.cost
    cut_id = plan.cut_id
    encoding = _ENCODING[plan.encoding]
    head = runtime.head(cut_id)

    def run_head() -> tuple[dict[str, np.ndarray], tuple[Tensor, ...], float, float]:
        t0 = time.perf_counter()
        frontier = runtime.run_head(cut_id, feeds)
        t1 = time.perf_counter()
        tensors = tuple(Tensor.from_array(n, a, encoding if a.dtype == np.float32 else
                                          Encoding.RAW) for n, a in frontier.items())
        return frontier, tensors, (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3

    assert daemon.pool is not None
    frontier, tensors, head_ms, encode_ms = await daemon.pool.run(run_head, priority)
    if head is not None:
        cost.observe_local(head.path, key, head_ms)
    info: dict[str, Any] = {"head_ms": round(head_ms, 3), "encode_ms": round(encode_ms, 3)}
    local_tail_ms = est.local_tail_ms
    budget_ms = (deadline - time.monotonic()) * 1e3 - local_tail_ms - \
        daemon.config.deadline_margin_ms
    outputs, response, reason, waited_ms = await send_to_cloud(
        daemon, model, cost, cut_id, key, tensors, budget_ms, priority, what="offload")
    if response is not None and outputs is not None and waited_ms is not None:
        info.update(ran="cloud", cloud_ms=round(waited_ms, 3),
                    cloud_compute_ms=round(response.timings.compute_ms, 3),
                    cloud_queue_ms=round(response.timings.queue_ms, 3),
                    worker_id=response.worker_id,
                    sent_bytes=sum(t.nbytes for t in tensors))
        return outputs, info
    if waited_ms is not None:
        info["cloud_ms"] = round(waited_ms, 3)
    # finish here from the frontier already computed (cut 0: the full model)
    tail = runtime.tail(cut_id)

    def run_tail() -> tuple[dict[str, np.ndarray], float]:
        t0 = time.perf_counter()
        out = runtime.run_tail(cut_id, frontier) if head is not None else \
            runtime.run_full(feeds)
        return out, (time.perf_counter() - t0) * 1e3

    outputs, tail_ms = await daemon.pool.run(run_tail, priority + 1)
    cost.observe_local(tail.path, key, tail_ms)
    info.update(ran="fallback", fallback_reason=reason, tail_ms=round(tail_ms, 3))
    return outputs, info


async def send_to_cloud(daemon: Any, model: ServingModel, cost: Any, cut_id: int, key: Any,
                        tensors: tuple[Tensor, ...], budget_ms: float, priority: int,
                        what: str) -> tuple[dict[str, np.ndarray] | None,
                                            InferenceResponse | None, str | None, float | None]:
    """Send ``tensors`` (cut ``cut_id``'s frontier; cut 0: the input) to the cloud with
    ``budget_ms``, and let the link estimates learn from the outcome. Returns ``(outputs,
    response, reason, waited_ms)``: ``reason`` is None when the cloud answered usefully, else
    why not (``disconnected`` and ``no_time``: nothing was sent and ``waited_ms`` is None)."""
    transport = daemon.transport
    if transport is None or not transport.connected:
        return None, None, "disconnected", None
    if budget_ms < daemon.config.cloud_budget_floor_ms:
        return None, None, "no_time", None
    up_bytes = sum(t.nbytes for t in tensors)
    request = InferenceRequest(
        id=new_request_id(), device_id=daemon.device_id, model_digest=cost.model_digest,
        cut_id=cut_id, budget_ms=max(1, int(budget_ms)), tensors=tensors,
        priority=priority, sent_at_ms=int(time.time() * 1000))
    t0 = time.monotonic()
    reason = None
    outputs = response = None
    try:
        response = await transport.request(
            topics.request_topic(daemon.device_id, model.name), request,
            timeout_s=budget_ms / 1000)
        outputs = cloud_outputs(model, response)
    except DeadlineExceeded:
        reason = "timeout"
    except Unavailable:
        reason = "unavailable"
    except ResourceExhausted:
        reason = "resource_exhausted"
    except (NotFound, FailedPrecondition) as exc:
        reason = "refused"
        log.warning("the cloud cannot run cut %d of %s: %s", cut_id, model.name, exc)
    except TandemError as exc:
        reason = "error"
        log.warning("%s of cut %d failed: %s", what, cut_id, exc)
    waited_ms = (time.monotonic() - t0) * 1e3
    if reason is not None or response is None:
        daemon.link.observe_offload_failed(cut_id, key, waited_ms=waited_ms,
                                           timed_out=reason == "timeout")
        return None, None, reason or "error", waited_ms
    down_bytes = sum(t.nbytes for t in response.outputs)
    daemon.link.observe_offload(
        cut_id, key, up_bytes=up_bytes, down_bytes=down_bytes, round_trip_ms=waited_ms,
        compute_ms=response.timings.compute_ms, queue_ms=response.timings.queue_ms)
    if daemon.link.probe_wanted:  # RTT or bandwidth? a probe now tells them apart
        daemon.probe_soon()
    return outputs, response, None, waited_ms

def cloud_outputs(model: ServingModel, response: InferenceResponse) -> dict[str, np.ndarray]:
    """The cloud's outputs as arrays, checked against the model's output names and fixed
    dims (InvalidArgument otherwise: a wrong answer counts as a failed offload)."""
    names = model.runtime.output_names
    outputs = {t.name: t.to_array() for t in response.outputs}
    if set(outputs) != set(names):
        raise InvalidArgument(f"the cloud answered outputs {sorted(outputs)[:8]}, the model "
                              f"has {list(names)}")
    specs = {t.name: t for t in model.bundle.manifest.outputs}
    for name, arr in outputs.items():
        if len(arr.shape) != len(specs[name].shape) or any(
                isinstance(d, int) and d != s
                for d, s in zip(specs[name].shape, arr.shape, strict=True)):
            raise InvalidArgument(f"the cloud answered {name!r} with shape "
                                  f"{list(arr.shape)}, the model's is "
                                  f"{list(specs[name].shape)}")
    return outputs
