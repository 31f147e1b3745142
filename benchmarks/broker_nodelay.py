"""What a broker without ``set_tcp_nodelay true`` costs: request/response through mosquitto.

    python -m benchmarks.broker_nodelay [--quick] [--json PATH]

Two mosquitto brokers on 127.0.0.1, identical but for ``set_tcp_nodelay true``; on each, a
responder process serving an echo with ``SyncTransport.serve`` and a requester in this process
sending 1 KB requests (MQTT 5, QoS 1) with ``SyncTransport.request``, interleaved A B A B. Without
the option mosquitto leaves Nagle's algorithm on for its sockets, and a small reply waits for
the peer's delayed ACK (tens of milliseconds). The figure is the ratio of the medians.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import Result, parser, print_table, stats, write_json
from tandem.protocol import (
    InferenceRequest,
    MqttTransport,
    SyncTransport,
    Tensor,
    TransportConfig,
    new_request_id,
)

NAME = "broker_nodelay"

_RESPONDER = """
import sys, time
from tandem.protocol import InferenceResponse, MqttTransport, SyncTransport, TransportConfig
with SyncTransport(MqttTransport(TransportConfig(port=int(sys.argv[1])))) as t:
    t.serve("tandem/v1/req/+/+", lambda r, ctx: InferenceResponse(id=r.id, outputs=r.tensors))
    print("ready", flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
"""


def _mosquitto() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None)
    if found is None:
        raise SystemExit("mosquitto not found (apt-get install mosquitto)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _broker(directory: Path, nodelay: bool) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    conf = directory / f"nodelay-{nodelay}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                    + ("set_tcp_nodelay true\n" if nodelay else ""))
    proc = subprocess.Popen([_mosquitto(), "-c", str(conf)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("mosquitto did not start")


def run(quick: bool) -> list[Result]:
    repeats, warmup = (60, 10) if quick else (300, 30)
    procs: list[subprocess.Popen] = []
    clients: dict[bool, SyncTransport] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="tandem-nodelay-") as tmp:
            for nodelay in (True, False):
                broker, port = _broker(Path(tmp), nodelay)
                responder = subprocess.Popen([sys.executable, "-c", _RESPONDER, str(port)],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             text=True)
                procs += [broker, responder]
                assert responder.stdout is not None
                if responder.stdout.readline().strip() != "ready":
                    raise SystemExit("the responder did not start")
                clients[nodelay] = SyncTransport(MqttTransport(TransportConfig(port=port)))
                clients[nodelay].__enter__()
            x = Tensor.from_array("x", np.ones(256, np.float32))  # 1 KiB
            samples: dict[bool, list[float]] = {True: [], False: []}
            for i in range(warmup + repeats):
                for nodelay, client in clients.items():
                    req = InferenceRequest(id=new_request_id(), device_id="cam-01",
                                           model_digest="0" * 64, cut_id=1, budget_ms=5000,
                                           tensors=(x,))
                    t0 = time.perf_counter()
                    client.request("tandem/v1/req/cam-01/m", req)
                    if i >= warmup:
                        samples[nodelay].append((time.perf_counter() - t0) * 1000)
    finally:
        for client in clients.values():
            client.__exit__(None, None, None)
        for proc in reversed(procs):  # each responder before its broker
            if proc.stdin:
                proc.stdin.close()
            proc.kill()
            proc.wait()
    with_nd, without = stats(samples[True]), stats(samples[False])
    return [Result(
        metric="rtt_1KiB_without_nodelay", value=without.median, unit="ms",
        baseline="rtt_1KiB_with_nodelay", baseline_value=with_nd.median, p99=without.p99,
        min=without.min, max=without.max, n=without.n,
        notes=f"with set_tcp_nodelay true: median {with_nd.median:.2f} ms, p99 "
              f"{with_nd.p99:.2f} ms; mosquitto, MQTT 5, QoS 1, loopback")]


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__ or NAME).parse_args(argv)
    results = run(args.quick)
    print_table("request/response: mosquitto without vs with set_tcp_nodelay true", results)
    out = write_json(NAME, results, args.json_path, notes=results[0].notes or "")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
