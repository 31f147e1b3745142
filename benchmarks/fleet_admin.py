"""Fleet benchmark: enrolling devices, and reading a fleet's status from its retained heartbeats
through mosquitto, against a raw paho client receiving the same retained messages.

    python -m benchmarks.fleet_admin [--devices N] [--quick] [--json PATH]

A fleet of N devices (SQLite registry) is enrolled one `add_device` at a time (each one
transaction that rewrites the password file, ACL and CRL); a mosquitto started here runs the
fleet's generated listeners, and every device's heartbeat is published retained. Then, from a
fresh connection each time, interleaved:

* ours: ``collect_rows`` as ``tandem fleet status`` runs it (connect as the admin client,
  subscribe ``tandem/v1/status/+``, the sync marker, decode and check every heartbeat, read the
  registry, join);
* baseline: a raw paho-mqtt client connecting with the same credentials on the same listener,
  subscribing the same filter and returning when N messages have arrived (no decoding, no
  registry).

Both use the plain-text password listener (no TLS handshake on either side). Reported, no
target in the issue.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks._common import Result, interleaved, parser, print_table, stats, write_json
from benchmarks._transport_bench import _broker_module, _mosquitto_version

__all__ = ["main"]

NAME = "fleet_admin"


def _raw_status_read(host: str, port: int, username: str, password: str, n: int) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    done = threading.Event()
    count = 0

    def on_message(client, userdata, msg) -> None:
        nonlocal count
        count += 1
        if count >= n:
            done.set()

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        client.subscribe("tandem/v1/status/+", qos=1)

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.username_pw_set(username, password)
    client.on_message = on_message
    client.on_connect = on_connect
    client.connect(host, port)
    client.loop_start()
    try:
        if not done.wait(60):
            raise RuntimeError(f"raw client got {count} of {n} retained heartbeats")
    finally:
        client.disconnect()
        client.loop_stop()


def run(devices: int, quick: bool) -> tuple[list[Result], str]:
    from tandem.devices.fleet import Fleet
    from tandem.devices.fleet._live import admin_session
    from tandem.devices.fleet._operations import collect_rows
    from tandem.protocol import topics
    from tandem.protocol.messages import DeviceStatus

    broker_mod = _broker_module()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="tandem-bench-fleet-") as tmp:
        root = Path(tmp)
        ports = []
        while len(ports) < 3:
            port = broker_mod.free_port()
            if port not in ports:
                ports.append(port)
        fleet, _ = Fleet.init(root / "fleet", name="bench", bind="127.0.0.1",
                              broker_hosts=("127.0.0.1",), tls_port=ports[0],
                              password_port=ports[1], plain_port=ports[2])
        add_s = []
        for i in range(devices):
            t0 = time.perf_counter()
            fleet.add_device(f"cam-{i:05d}", profile="cpu-x86_64")
            add_s.append(time.perf_counter() - t0)
        add = stats(add_s)
        tail = stats(add_s[-max(1, devices // 10):])
        results.append(Result(
            metric=f"add_device_{devices}", value=add.median * 1e3, unit="ms", p99=add.p99 * 1e3,
            min=add.min * 1e3, max=add.max * 1e3, n=add.n,
            notes=f"one transaction each, auth files rewritten whole; the last 10% took "
                  f"{tail.median * 1e3:.1f} ms (median) with {devices} clients in the files"))
        broker = broker_mod.Mosquitto(
            root / "broker", extra_config=f"include_dir {fleet.layout.broker_conf.parent}")
        with broker:
            plain = f"mqtt://127.0.0.1:{ports[2]}"
            admin = fleet.admin_enrollment()
            now = int(time.time() * 1000)

            async def publish_heartbeats() -> None:
                async with admin_session(admin, broker_url=plain) as session:
                    handles = [await session.transport.publish_message(
                        topics.status_topic(f"cam-{i:05d}"), DeviceStatus(
                            f"cam-{i:05d}", "online", now, bundle_digest="ab" * 32,
                            p50_ms=12.0, p99_ms=40.0, fallbacks=1,
                            plan_mix=(("local", 10), ("cut 3", 5))), qos=1, retain=True)
                        for i in range(devices)]
                    for handle in handles:
                        await handle

            deadline = time.monotonic() + 10
            while True:  # the broker listens on the fleet's ports a moment after its own
                try:
                    asyncio.run(publish_heartbeats())
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

            def ours() -> None:
                rows = asyncio.run(collect_rows(fleet, broker_url=plain))
                assert sum(r.state == "online" for r in rows) == devices, rows[:3]

            def raw() -> None:
                _raw_status_read("127.0.0.1", ports[2], admin.username, admin.password,
                                 devices)

            repeats = 5 if quick else 30
            samples = interleaved({"ours": ours, "raw": raw}, repeats=repeats, warmup=2)
            ours_s, raw_s = stats(samples["ours"]), stats(samples["raw"])
            results.append(Result(
                metric=f"status_read_{devices}", value=ours_s.median * 1e3, unit="ms",
                p99=ours_s.p99 * 1e3, min=ours_s.min * 1e3, max=ours_s.max * 1e3,
                n=ours_s.n, baseline=f"raw_paho_retained_read_{devices}",
                baseline_value=raw_s.median * 1e3,
                notes="fresh connection each time; ours also reads the SQLite registry and "
                      "checks every heartbeat"))
            version = _mosquitto_version(broker.binary)
    notes = (f"{devices} devices, SQLite registry on local disk, {version} on 127.0.0.1 "
             "(set_tcp_nodelay true), MQTT 5, plain-text password listener for both sides; "
             "shared 2-core machine: indicative")
    return results, notes


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or NAME)
    p.add_argument("--devices", type=int, default=500, help="fleet size (default 500)")
    args = p.parse_args(argv)
    devices = min(args.devices, 100) if args.quick else args.devices
    results, notes = run(devices, args.quick)
    print_table(f"fleet: {devices} devices", results)
    out = write_json(NAME, results, args.json_path, notes=notes)
    print(notes)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
