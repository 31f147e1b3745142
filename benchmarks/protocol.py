"""Protocol benchmark: codec round trip vs a numpy copy, and request/response through mosquitto
vs a raw paho echo, plus small-message throughput.

    python -m benchmarks.protocol [--quick] [--json PATH]
"""

from __future__ import annotations

import sys

from benchmarks import _codec_bench, _transport_bench
from benchmarks._common import parser, print_table, write_json

NAME = "protocol"


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__ or NAME).parse_args(argv)
    codec = _codec_bench.run(quick=args.quick)
    print_table("codec: encode+decode vs numpy copy", codec)
    transport = _transport_bench.run(quick=args.quick)
    print_table("transport: request/response vs raw paho echo (QoS 1, mosquitto)", transport)
    results = [*codec, *transport]
    out = write_json(NAME, results, args.json_path, notes=_transport_bench.NOTES)
    print(f"wrote {out}")
    return 0 if all(r.met is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
