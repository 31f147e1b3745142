"""The edge daemon: ``tandem edge run``.

It serves a bundle on the device through a local KServe v2 (Open Inference Protocol) HTTP API,
measures every part of the model here, and per request runs the plan with the lowest expected
latency — all local, split at a cut, or all in the cloud — offloading over MQTT with a fallback
that finishes locally from the split point; deferrable cloud requests wait in a durable spool
while the cloud is unreachable. See ``docs/edge.md``.

    from tandem.edge import EdgeDaemon, RequestOptions, load_config
    daemon = EdgeDaemon(load_config({"bundle": "b", "device_id": "cam-01"}))
    await daemon.start(); answer = await daemon.infer(feeds, RequestOptions(deadline_ms=50))

Applications talk to a running daemon with :class:`Client` (blocking) or :class:`AsyncClient`.
The planner's cost model (:class:`CostModel`, :class:`Plan`, :class:`Estimate`,
:class:`Planner`) is public so other plan kinds can be costed by the same model.

Nothing heavy loads on import: ONNX Runtime when a bundle loads, aiohttp when the API starts,
prometheus-client when the daemon starts, zeroconf when presence starts.
"""

from tandem.edge._client import AsyncClient, Client, InferResult
from tandem.edge._config import MODES, EdgeConfig, load_config, parse_mode
from tandem.edge._daemon import Answer, Deferred, EdgeDaemon, RequestOptions
from tandem.edge._link import LinkEstimator
from tandem.edge._planner import CostModel, Decision, Estimate, Plan, Planner
from tandem.edge._serve import run, serve

__all__ = [
    "MODES",
    "Answer",
    "AsyncClient",
    "Client",
    "CostModel",
    "Decision",
    "Deferred",
    "EdgeConfig",
    "EdgeDaemon",
    "Estimate",
    "InferResult",
    "LinkEstimator",
    "Plan",
    "Planner",
    "RequestOptions",
    "load_config",
    "parse_mode",
    "run",
    "serve",
]
