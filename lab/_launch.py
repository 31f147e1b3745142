"""``python -m tandem.lab._launch JOIN_FILE -- ARGS…``: run ``tandem ARGS…`` in this process,
after importing what the edge daemon and the cloud worker load (numpy, ONNX Runtime, aiohttp,
prometheus-client, zeroconf, paho) and then writing this process's pid to JOIN_FILE — a
cgroup's ``cgroup.procs`` (the write moves the process into it) or a file a
:class:`~tandem.lab._throttle.CpuLimit` duty cycle watches. So a process held to a small CPU
share (the demo's and benchmarks' slow "device") is throttled for its work — loading models,
profiling them, serving — and not for the seconds Python spends importing.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != "--":
        print("usage: python -m tandem.lab._launch JOIN_FILE -- TANDEM_ARGS...", file=sys.stderr)
        return 2
    join_file, args = argv[0], argv[2:]
    for name in ("numpy", "onnxruntime", "aiohttp", "aiohttp.web", "prometheus_client",
                 "zeroconf", "paho.mqtt.client", "msgpack", "tandem.edge", "tandem.cloud",
                 "tandem.protocol.mqtt", "tandem.protocol.kserve"):
        with contextlib.suppress(ImportError):  # not installed: the command says so itself
            importlib.import_module(name)
    if join_file:
        with open(join_file, "w") as f:
            f.write(str(os.getpid()))
    from tandem.cli import main as tandem_main

    return tandem_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
