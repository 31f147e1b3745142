"""A Tandem server (and a requester) in a process of its own, so that an attack's cost to it
(peak RSS) can be measured from outside.

    python -m tests.security._transport_target HOST PORT 'OPTIONS_JSON'

It serves ``tandem/v1/req/+/+`` with a handler that blocks until released (``"stuck": true``)
or echoes, with the ``serve`` options given (``limits`` as Limits fields, ``max_queued_bytes``,
``max_concurrency``, ``max_queued``), and has a requester whose reply topic
``tandem/v1/resp/victim`` is subscribed (one request nobody answers). Then it reads commands
from stdin, one per line, and answers each with one JSON line on stdout:

* ``stats`` → ``{"rss": bytes, "peak": bytes, "serving": {...}, "client": {...}}`` — ``peak``
  is the high-water mark of RSS since the last ``reset_peak``;
* ``reset_peak`` → restart the peak-RSS mark (``/proc/self/clear_refs``) and report ``stats``;
* ``release`` → let stuck handlers return; ``quit`` → close both transports and exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import threading

from tandem.protocol.codec import Limits
from tandem.protocol.errors import DeadlineExceeded
from tandem.protocol.messages import InferenceRequest, InferenceResponse, new_request_id
from tandem.protocol.mqtt import MqttTransport
from tandem.protocol.transport import SyncTransport, TransportConfig

REQ_FILTER = "tandem/v1/req/+/+"


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main(host: str, port: int, options: dict) -> None:
    release = threading.Event()
    stuck = bool(options.pop("stuck", False))

    def handler(request, ctx):
        if stuck:
            release.wait(60)
        return InferenceResponse(id=request.id, worker_id="target")

    limits = options.pop("limits", None)
    cfg = TransportConfig(host=host, port=port)
    with SyncTransport(MqttTransport(cfg)) as server, SyncTransport(MqttTransport(cfg)) as client:
        server.serve(REQ_FILTER, handler, limits=Limits(**limits) if limits else None, **options)
        with contextlib.suppress(DeadlineExceeded):  # subscribes tandem/v1/resp/victim
            client.request("nobody/serves/this", InferenceRequest(
                new_request_id(), "victim", "m", 1, 200, ()), timeout_s=0.2)
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "quit":
                release.set()
                break
            if command == "release":
                release.set()
            if command == "reset_peak":
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            stats = {
                "rss": _status("VmRSS"), "peak": _status("VmHWM"),
                "serving": dataclasses.asdict(server.stats().serving[REQ_FILTER]),
                "client": {k: v for k, v in dataclasses.asdict(client.stats()).items()
                           if k != "serving"},
                "connected": server.connected and client.connected,
            }
            print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]))
