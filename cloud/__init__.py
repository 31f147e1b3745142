"""The cloud endpoint: ``tandem cloud serve``.

Workers share one MQTT subscription (``$share/<group>/tandem/v1/req/+/+``), run the tails of the
bundles in a model repository in dynamic batches, answer every request exactly once (at least
once across crashes, idempotent by id), publish their load, and serve health, Prometheus metrics,
KServe v2 inference and the repository's bundles over HTTP.

    from tandem.cloud import load_config, serve
    serve(load_config({"repo": "bundles", "broker": "mqtt://127.0.0.1:1883"}))

Nothing heavy loads on import: ONNX Runtime when a part is first used, aiohttp when the HTTP
port opens, prometheus-client when a worker starts.
"""

from tandem.cloud._batcher import BatchPolicy, Dispatcher, Outcome
from tandem.cloud._config import BrokerAddress, CloudConfig, load_config, parse_broker
from tandem.cloud._repository import BundleEntry, ModelRepository, Part, ScanReport
from tandem.cloud._serve import serve, serve_async
from tandem.cloud._worker import Worker

__all__ = [
    "BatchPolicy",
    "BrokerAddress",
    "BundleEntry",
    "CloudConfig",
    "Dispatcher",
    "ModelRepository",
    "Outcome",
    "Part",
    "ScanReport",
    "Worker",
    "load_config",
    "parse_broker",
    "serve",
    "serve_async",
]
