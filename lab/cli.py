"""``tandem link …`` (the link emulator) and ``tandem demo`` (loaded by the ``tandem``
dispatcher)."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["demo_command", "link_command"]


def _address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT`` or ``PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = default_host, text
    host = host.strip("[]") or default_host
    try:
        number = int(port)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not HOST:PORT or PORT") from None
    if not 0 <= number <= 65535:
        raise click.BadParameter(f"port {number} is not in [0, 65535]")
    return host, number


class _Address(click.ParamType):
    name = "HOST:PORT"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        return _address(value)


def _profile_options(fn):
    for decorator in reversed([
        click.option("--profile", type=click.Choice(["3g", "lte", "wifi", "wired", "unlimited"]),
                     help="a named link class (tandem link profiles); the options below "
                          "change it"),
        click.option("--rate", metavar="RATE",
                     help="both directions, e.g. 6mbit, 500kbit (bits per second)"),
        click.option("--up-rate", metavar="RATE", help="client -> target (edge -> broker)"),
        click.option("--down-rate", metavar="RATE", help="target -> client"),
        click.option("--delay-ms", type=float, metavar="MS", help="one-way delay, each way"),
        click.option("--jitter-ms", type=float, metavar="MS",
                     help="each chunk's delay varies within +-MS (never reordering)"),
        click.option("--burst-bytes", type=int, metavar="B",
                     help="token bucket depth  [default: one chunk, ~1 ms of the rate]"),
    ]):
        fn = decorator(fn)
    return fn


def _changes(rate, up_rate, down_rate, delay_ms, jitter_ms, burst_bytes) -> dict:
    changes: dict = {}
    if rate is not None:
        changes["uplink_bps"] = changes["downlink_bps"] = rate
    if up_rate is not None:
        changes["uplink_bps"] = up_rate
    if down_rate is not None:
        changes["downlink_bps"] = down_rate
    for key, value in (("delay_ms", delay_ms), ("jitter_ms", jitter_ms),
                       ("burst_bytes", burst_bytes)):
        if value is not None:
            changes[key] = value
    return changes


@click.group(name="link", context_settings={"help_option_names": ["-h", "--help"]})
def link_command() -> None:
    """Emulate a network link: a TCP proxy adding delay, jitter, a bandwidth limit and outages.

    Put it between an edge daemon and its broker: `tandem link run --to 127.0.0.1:1883
    --listen 2883 --profile lte`, then point the edge at mqtt://127.0.0.1:2883.
    """


@link_command.command(name="profiles")
@click.option("--json", "as_json", is_flag=True, help="print JSON for programs")
def profiles_command(as_json: bool) -> None:
    """The named link classes."""
    import json

    from tandem.console import Column, print_table
    from tandem.lab import PROFILES, format_rate

    if as_json:
        click.echo(json.dumps({n: p.to_dict() for n, p in PROFILES.items()}, indent=2))
        return
    rows = [[p.name, format_rate(p.uplink_bps), format_rate(p.downlink_bps),
             f"{p.delay_ms:g}", f"{p.rtt_ms:g}", f"{p.jitter_ms:g}"] for p in PROFILES.values()]
    print_table([Column("profile"), Column("uplink", justify="right"),
                 Column("downlink", justify="right", fold=2),
                 Column("one-way ms", justify="right"), Column("RTT ms", justify="right", fold=1),
                 Column("jitter ms", justify="right", fold=3)], rows)


@link_command.command(name="run", context_settings={"max_content_width": 100})
@click.option("--to", "target", type=_Address(), required=True,
              help="where connections go (the broker), HOST:PORT")
@click.option("--listen", type=_Address(), default="127.0.0.1:0", show_default=True,
              help="where to accept connections, HOST:PORT or PORT (0: any free port)")
@_profile_options
@click.option("--schedule", type=click.Path(path_type=Path), metavar="FILE",
              help="TOML file of timed changes and outages ([[step]] tables with at_s and "
                   "profile, profile fields, or outage_s and mode)")
@click.option("--control", type=_Address(), metavar="HOST:PORT",
              help="accept changes from `tandem link set` here (JSON lines; 127.0.0.1 unless "
                   "a host is given)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the jitter")
@click.option("--duration-s", type=float, metavar="S",
              help="stop after this long  [default: until SIGINT/SIGTERM]")
def run_command(target, listen, profile, rate, up_rate, down_rate, delay_ms, jitter_ms,
                burst_bytes, schedule, control, seed, duration_s) -> None:
    """Run the emulated link until SIGINT/SIGTERM (or --duration-s), then print what crossed."""
    import asyncio
    import logging
    import signal

    from tandem.lab import PROFILES, LinkEmulator
    from tandem.lab._control import ControlServer, load_schedule, profile_from

    start = profile_from(PROFILES[profile or "unlimited"], None,
                         _changes(rate, up_rate, down_rate, delay_ms, jitter_ms, burst_bytes))
    if profile and start != PROFILES[profile]:
        start = start.with_changes(name=f"{profile}+changes")
    steps = load_schedule(schedule, start) if schedule else []
    if duration_s is not None and not duration_s > 0:
        raise click.BadParameter("--duration-s must be > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")

    async def main():
        link = LinkEmulator(target[0], target[1], start, listen_host=listen[0],
                            listen_port=listen[1], seed=seed)
        await link.start()
        server = None
        try:
            click.echo(f"link {listen[0]}:{link.port} -> {target[0]}:{target[1]}: "
                       f"{start.describe()}")
            if control is not None:
                server = await ControlServer(link, *control).start()
                click.echo(f"control on {server.host}:{server.port} (tandem link set --control "
                           f"{server.host}:{server.port} ...)")
            if steps:
                link.run_schedule(steps)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            try:
                await asyncio.wait_for(stop.wait(), duration_s)
            except asyncio.TimeoutError:
                pass
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
            return link.stats()
        finally:
            if server is not None:
                await server.close()
            await link.close()

    stats = asyncio.run(main())
    click.echo(f"stopped: {stats.connections_total} connections; "
               f"{stats.uplink.bytes} bytes up, {stats.downlink.bytes} bytes down")


@link_command.command(name="set")
@click.option("--control", type=_Address(), required=True, metavar="HOST:PORT",
              help="the control address given to `tandem link run --control`")
@_profile_options
@click.option("--down", "down_s", type=float, metavar="S",
              help="take the link down for S seconds (0: until --up)")
@click.option("--mode", type=click.Choice(["stall", "reset"]), default="stall",
              show_default=True, help="stall holds bytes; reset closes connections")
@click.option("--up", is_flag=True, help="bring the link back up")
def set_command(control, profile, rate, up_rate, down_rate, delay_ms, jitter_ms, burst_bytes,
                down_s, mode, up) -> None:
    """Change a running link: its profile, its fields, or an outage."""
    from tandem.lab._control import control_request

    changes = _changes(rate, up_rate, down_rate, delay_ms, jitter_ms, burst_bytes)
    if down_s is not None and up:
        raise click.UsageError("--down and --up contradict each other")
    if down_s is not None and down_s < 0:
        raise click.BadParameter("--down must be >= 0")
    requests = []
    if profile or changes:
        requests.append({"op": "set", "profile": profile, "changes": changes})
    if down_s is not None:
        requests.append({"op": "down", "mode": mode, "outage_s": down_s or None})
    if up:
        requests.append({"op": "up"})
    if not requests:
        raise click.UsageError("nothing to change: give --profile, a field, --down or --up")
    host, port = control
    for request in requests:
        state = control_request(host, port, request)
    _show(state)


@link_command.command(name="show")
@click.option("--control", type=_Address(), required=True, metavar="HOST:PORT",
              help="the control address given to `tandem link run --control`")
@click.option("--json", "as_json", is_flag=True, help="print JSON for programs")
def show_command(control, as_json: bool) -> None:
    """What a running link does now, and what crossed it."""
    import json

    from tandem.lab._control import control_request

    host, port = control
    state = control_request(host, port, {"op": "show"})
    if as_json:
        click.echo(json.dumps(state, indent=2))
    else:
        _show(state)


def _show(state: dict) -> None:
    from tandem.console import print_lines
    from tandem.lab import LinkProfile

    profile = LinkProfile(**state["profile"])
    up, down = state["uplink"], state["downlink"]
    print_lines(
        f"{profile.describe()}{' — DOWN' if state['is_down'] else ''}",
        f"connections: {state['connections_open']} open, {state['connections_total']} in all, "
        f"{state['connections_refused']} refused",
        f"uplink: {up['bytes']} bytes, {up['queued_bytes']} queued; "
        f"downlink: {down['bytes']} bytes, {down['queued_bytes']} queued")


@click.command(name="demo", context_settings={"max_content_width": 100})
@click.option("--links", default="wired,wifi,3g", show_default=True,
              help="emulated links to run under, in order (from: 3g, lte, wifi, wired)")
@click.option("--requests", type=click.IntRange(1, 1000), default=6, show_default=True,
              help="requests per forced plan and link (auto gets twice as many)")
@click.option("--edge-cpu", type=click.FloatRange(0, 1, min_open=True), default=0.1,
              show_default=True,
              help="the edge daemon's share of one CPU, so the device computes slower than the "
                   "cloud (1: not held back)")
@click.option("--broker", type=click.Choice(["auto", "mosquitto", "embedded"]), default="auto",
              show_default=True,
              help="auto: mosquitto when installed, else the embedded MQTT 3.1.1 broker")
@click.option("--work-dir", type=click.Path(path_type=Path), metavar="DIR",
              help="keep the bundle and every process's log here  [default: a temporary "
                   "directory, removed]")
@click.option("--json", "json_path", type=click.Path(path_type=Path), metavar="FILE",
              help="also write the results as JSON")
def demo_command(links: str, requests: int, edge_cpu: float, broker: str,
                 work_dir: Path | None, json_path: Path | None) -> None:
    """Compile a model, start a broker, a cloud worker and an edge daemon, and show which plan
    wins under emulated links (under a minute).

    The edge daemon runs behind the link emulator, held to a share of one CPU (a cgroup when
    this machine allows one, else a SIGSTOP/SIGCONT duty cycle); requests go through its local
    KServe v2 API with every plan forced and with auto. The model's weights are random: its
    answers mean nothing, its costs are real. Everything started is stopped at the end, also on
    Ctrl-C.
    """
    from tandem.lab._demo import DemoOptions, print_result, run_demo
    from tandem.protocol.lazy import require

    require("onnxruntime", "cpu")
    require("aiohttp", "edge")
    require("prometheus_client", "edge")
    options = DemoOptions(links=tuple(n.strip() for n in links.split(",") if n.strip()),
                          requests=requests, edge_cpu=edge_cpu, broker=broker,
                          work_dir=work_dir)
    if json_path is not None and json_path.exists() and not json_path.is_file():
        raise click.BadParameter(f"{json_path} is not a file", param_hint="--json")
    result = run_demo(options, lambda line: click.echo(line, err=True))
    print_result(result, options)
    if json_path is not None:
        json_path.write_text(result.to_json() + "\n")
