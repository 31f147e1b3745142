"""``tandem fleet``: enroll devices and cloud workers, rotate and revoke their credentials,
assign signed bundles, and watch the fleet.

Every subcommand takes ``--fleet-dir DIR`` (default ``./fleet``, or ``TANDEM_FLEET_DIR``) and
``--db URL`` (default: the SQLite registry in the fleet directory, or the URL given at init, or
``TANDEM_FLEET_DB``). Light at import: click only; everything else loads inside the command.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
from collections.abc import Callable
from typing import Any

import click

__all__ = ["fleet_command"]


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    @click.option("--fleet-dir", "fleet_dir", metavar="DIR",
                  default=lambda: os.environ.get("TANDEM_FLEET_DIR", "fleet"),
                  show_default="./fleet (TANDEM_FLEET_DIR)", help="the fleet directory")
    @click.option("--db", "db_url", metavar="URL", default=None,
                  help="registry database: sqlite:///PATH or postgresql://USER@HOST/DB "
                       "(default: as at init; TANDEM_FLEET_DB)")
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


def _open(fleet_dir: str, db_url: str | None):
    from tandem.devices.fleet import Fleet

    return Fleet.open(fleet_dir, db_url)


def _say(text: str) -> None:
    click.echo(text)  # a closed stdout (| head) is the dispatcher's to end quietly


def _note(text: str) -> None:
    click.echo(f"note: {text}", err=True)


def _reload(fleet) -> None:
    """Reload the broker after an auth change; a failure is the command's error (the change
    itself is committed, and the message says so)."""
    from tandem.protocol.errors import Unavailable

    try:
        message = fleet.broker_reload()
    except Unavailable as exc:
        raise Unavailable(f"{exc} (the registry and the auth files are updated; reload the "
                          "broker by hand)") from exc
    if message.startswith("broker reloaded"):
        _say(message)
    else:
        _note(message)


def _run(coro):
    import asyncio

    return asyncio.run(coro)


def _iso(ms: int | None) -> str:
    import datetime as dt

    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


@click.group(name="fleet", context_settings={"help_option_names": ["-h", "--help"]})
def fleet_command() -> None:
    """Provision a fleet: registry, per-device credentials and ACLs, TLS, signed bundles."""


# -- init --------------------------------------------------------------------------------------


@fleet_command.command("init")
@_common
@click.option("--name", help="fleet name (default: the directory's name)")
@click.option("--broker-host", "broker_hosts", multiple=True, metavar="HOST",
              help="host name or IP address of the broker, for its certificate and the "
                   "enrollment URLs (repeatable; the first is used in URLs) [default: localhost]")
@click.option("--bind", default="", metavar="ADDR", help="address the broker listeners bind "
              "(default: all)")
@click.option("--tls-port", type=int, default=8883, show_default=True,
              help="TLS listener with client certificates")
@click.option("--password-port", type=int, default=8884, show_default=True,
              help="TLS listener with username and password")
@click.option("--plain-port", type=int, default=0, show_default="none",
              help="also a plain-text username/password listener (trusted networks only)")
@click.option("--broker-pid-file", default="", metavar="PATH",
              help="mosquitto's pid file: fleet commands send it SIGHUP to reload")
@click.option("--reload-command", default="", metavar="CMD",
              help="or a command that reloads the broker, e.g. 'systemctl reload mosquitto'")
@click.option("--bundle-base-url", default="", metavar="URL",
              help="where fleet/bundles/ is served, e.g. http://fleet-host:8080 "
                   "(tandem fleet dashboard serves it)")
def init_command(fleet_dir: str, db_url: str | None, name: str | None,
                 broker_hosts: tuple[str, ...], bind: str, tls_port: int, password_port: int,
                 plain_port: int, broker_pid_file: str, reload_command: str,
                 bundle_base_url: str) -> None:
    """Create the registry, a CA, a bundle-signing key pair and the broker's auth files."""
    from tandem.devices.fleet import Fleet

    fleet, result = Fleet.init(
        fleet_dir, name=name, db_url=db_url, broker_hosts=broker_hosts or ("localhost",),
        bind=bind, tls_port=tls_port, password_port=password_port, plain_port=plain_port,
        pid_file=broker_pid_file, reload_command=tuple(shlex.split(reload_command)),
        bundle_base_url=bundle_base_url)
    layout = fleet.layout
    _say(result.message)
    _say(f"  registry:        {result.data['registry']}")
    _say(f"  broker config:   {layout.broker_conf}  (mosquitto -c FILE, or include_dir "
         f"{layout.broker_conf.parent})")
    _say(f"  CA certificate:  {layout.ca_cert}")
    _say(f"  bundle key:      {layout.signing_pub} (public), {layout.signing_key} (secret)")
    _say(f"  admin client:    {layout.enrollment('tandem-admin')} (secret)")


# -- enrolling ---------------------------------------------------------------------------------


def _enrolled(fleet, result) -> None:
    from tandem.devices.fleet import ADMIN_NAME

    _say(result.message)
    for path in result.files:
        if path.stem == ADMIN_NAME:
            _say(f"  enrollment file: {path}  (secret: the fleet commands use it; keep it here)")
        else:
            _say(f"  enrollment file: {path}  (secret: install it on the machine, then delete "
                 "it here)")
    _reload(fleet)


@fleet_command.command("add")
@_common
@click.argument("device")
@click.option("--profile", required=True, metavar="ID",
              help="device profile (see 'tandem devices')")
@click.option("--group", metavar="NAME", help="put it in this group (see 'tandem fleet group')")
def add_command(fleet_dir: str, db_url: str | None, device: str, profile: str,
                group: str | None) -> None:
    """Register DEVICE and write its enrollment file (fleet/enroll/DEVICE.toml)."""
    fleet = _open(fleet_dir, db_url)
    _enrolled(fleet, fleet.add_device(device, profile=profile, group=group))


@fleet_command.command("add-worker")
@_common
@click.argument("name")
def add_worker_command(fleet_dir: str, db_url: str | None, name: str) -> None:
    """Credentials for a cloud worker: it reads every device's requests (shared subscription)
    and writes replies and its own load topic, nothing else."""
    fleet = _open(fleet_dir, db_url)
    _enrolled(fleet, fleet.add_worker(name))


@fleet_command.command("rotate")
@_common
@click.argument("name")
def rotate_command(fleet_dir: str, db_url: str | None, name: str) -> None:
    """New password and certificate for a device or worker; the old ones stop working when
    the broker reloads."""
    fleet = _open(fleet_dir, db_url)
    _enrolled(fleet, fleet.rotate(name))


@fleet_command.command("remove")
@_common
@click.argument("name")
@click.option("--broker", "broker_url", metavar="URL", help="broker URL for the admin client")
@click.option("--keep-retained", is_flag=True,
              help="leave the device's retained assignment and heartbeat on the broker")
def remove_command(fleet_dir: str, db_url: str | None, name: str, broker_url: str | None,
                   keep_retained: bool) -> None:
    """Revoke a device or worker: out of the auth files, certificate on the CRL, broker
    reloaded, retained topics cleared."""
    from tandem.devices.fleet._operations import clear_retained
    from tandem.protocol.errors import TandemError

    fleet = _open(fleet_dir, db_url)
    result = fleet.remove(name)
    _say(result.message)
    _reload(fleet)
    if result.data.get("kind") == "device" and not keep_retained:
        try:
            _run(clear_retained(fleet, name, broker_url=broker_url))
        except TandemError as exc:
            _note(f"could not clear {name}'s retained topics: {exc}")


@fleet_command.command("sync")
@_common
@click.option("--publish", is_flag=True, help="also publish every recorded assignment again")
@click.option("--broker", "broker_url", metavar="URL", help="broker URL for the admin client")
def sync_command(fleet_dir: str, db_url: str | None, publish: bool,
                 broker_url: str | None) -> None:
    """Rewrite the broker's auth files (and renew the CRL) from the registry."""
    from tandem.devices.fleet._operations import publish_all

    fleet = _open(fleet_dir, db_url)
    _say(fleet.sync().message)
    _reload(fleet)
    if publish:
        _say(f"{_run(publish_all(fleet, broker_url=broker_url))} assignment(s) published")


# -- groups ------------------------------------------------------------------------------------


@fleet_command.group("group")
def group_command() -> None:
    """Groups of devices, for 'add --group' and 'assign --group'."""


@group_command.command("add")
@_common
@click.argument("name")
def group_add_command(fleet_dir: str, db_url: str | None, name: str) -> None:
    """Create group NAME."""
    _say(_open(fleet_dir, db_url).add_group(name).message)


@group_command.command("remove")
@_common
@click.argument("name")
def group_remove_command(fleet_dir: str, db_url: str | None, name: str) -> None:
    """Remove the empty group NAME."""
    _say(_open(fleet_dir, db_url).remove_group(name).message)


@group_command.command("list")
@_common
@click.option("--json", "as_json", is_flag=True)
def group_list_command(fleet_dir: str, db_url: str | None, as_json: bool) -> None:
    """The groups and how many devices each holds."""
    groups = _open(fleet_dir, db_url).groups()
    if as_json:
        _say(json.dumps(groups, indent=2))
        return
    from tandem.console import Column, print_table

    print_table([Column("GROUP"), Column("DEVICES", justify="right"), Column("CREATED")],
                [[g["name"], str(g["devices"]), _iso(g["created_ms"])] for g in groups])


# -- reading -----------------------------------------------------------------------------------


@fleet_command.command("list")
@_common
@click.option("--all", "include_removed", is_flag=True, help="include removed clients")
@click.option("--json", "as_json", is_flag=True)
def list_command(fleet_dir: str, db_url: str | None, include_removed: bool,
                 as_json: bool) -> None:
    """Devices, workers and the admin client, with their assigned bundles."""
    fleet = _open(fleet_dir, db_url)
    clients = fleet.clients(include_removed=include_removed)
    if as_json:
        _say(json.dumps(clients, indent=2))
        return
    from tandem.console import Column, print_table

    columns = [Column("NAME"), Column("KIND"), Column("PROFILE", fold=2),
               Column("GROUP", fold=3), Column("BUNDLE", fold=1), Column("CERT UNTIL", fold=4)]
    if include_removed:
        columns.insert(2, Column("STATE"))
    rows = []
    for c in clients:
        bundle = ""
        if c["bundle_digest"]:
            bundle = f"{c['model_name']} {c['model_version']} {c['bundle_digest'][:8]}"
        cells = [c["name"], c["kind"], c["profile"] or "", c["group_name"] or "", bundle,
                 _iso(c["not_after_ms"])[:10]]
        if include_removed:
            cells.insert(2, c["state"])
        rows.append(cells)
    print_table(columns, rows)
    _warn_auth(fleet)


def _warn_auth(fleet) -> None:
    if fleet.auth_lagging():
        _note("the auth files lag the registry: run 'tandem fleet sync'")
    warning = fleet.crl_expiry_warning()
    if warning:
        _note(warning)


@fleet_command.command("show")
@_common
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def show_command(fleet_dir: str, db_url: str | None, name: str, as_json: bool) -> None:
    """Everything the registry knows about a device or worker."""
    info = _open(fleet_dir, db_url).show(name)
    if as_json:
        _say(json.dumps(info, indent=2))
        return
    _say(f"{info['kind']} {info['name']} ({info['state']})")
    if info["profile"]:
        _say(f"  profile:     {info['profile']}")
    if info["group_name"]:
        _say(f"  group:       {info['group_name']}")
    _say(f"  enrolled:    {_iso(info['created_ms'])} UTC, changed {_iso(info['updated_ms'])}")
    if info["enrollment_file"]:
        _say(f"  enrollment:  {info['enrollment_file']}")
    for cert in info["certificates"][:5]:
        state = (f"revoked {_iso(cert['revoked_ms'])} ({cert['revoke_reason']})"
                 if cert["revoked_ms"] else f"valid until {_iso(cert['not_after_ms'])}")
        _say(f"  certificate: {cert['serial'][:16]}… {state}")
    a = info["assignment"]
    if a:
        _say(f"  assignment:  {a['model_name']} {a['model_version']} {a['bundle_digest']}")
        _say(f"               {a['archive_size']} bytes, assigned {_iso(a['issued_ms'])}")
        for uri in a["uris"]:
            _say(f"               {uri}")
    if info["acl"]:
        _say("  may:         " + "\n               ".join(info["acl"]))
    if info["events"]:
        _say("  history:")
        for e in info["events"][:10]:
            _say(f"    {_iso(e['at_ms'])}  {e['action']:<10} {e['detail']}")


# -- assignments and status --------------------------------------------------------------------


@fleet_command.command("assign")
@_common
@click.argument("args", nargs=-1, required=True, metavar="[DEVICE]... BUNDLE")
@click.option("--group", metavar="NAME", help="assign to every device of this group")
@click.option("--sign", is_flag=True,
              help="sign the bundle with the fleet's key if it is not signed with it")
@click.option("--url", "urls", multiple=True, metavar="URL",
              help="where devices fetch the archive (repeatable: mirrors; {digest} is "
                   "replaced by the bundle digest); default: bundles.base_url from fleet.toml")
@click.option("--broker", "broker_url", metavar="URL", help="broker URL for the admin client")
def assign_command(fleet_dir: str, db_url: str | None, args: tuple[str, ...],
                   group: str | None, sign: bool, urls: tuple[str, ...],
                   broker_url: str | None) -> None:
    """Assign BUNDLE (a bundle directory or archive) to devices and/or a group: verify it,
    sign it if asked, store its archive in fleet/bundles/ and publish a retained assignment to
    each device."""
    from tandem.devices.fleet._operations import assign
    from tandem.protocol.errors import InvalidArgument

    *devices, bundle = args
    if not devices and group is None:
        raise InvalidArgument("name a DEVICE or a --group to assign BUNDLE to")
    fleet = _open(fleet_dir, db_url)
    result = _run(assign(fleet, bundle, devices=devices, group=group, sign=sign, urls=urls,
                         broker_url=broker_url))
    _say(f"assigned {result.model} {result.digest[:12]} to {len(result.devices)} device(s): "
         + ", ".join(result.devices))
    for uri in result.uris:
        _say(f"  devices fetch it from {uri}")


@fleet_command.command("status")
@_common
@click.option("--json", "as_json", is_flag=True)
@click.option("--broker", "broker_url", metavar="URL", help="broker URL for the admin client")
@click.option("--stale-after", "stale_after_s", type=click.FloatRange(min=1), default=90.0,
              show_default=True,
              help="seconds after which an 'online' heartbeat shows as stale")
def status_command(fleet_dir: str, db_url: str | None, as_json: bool, broker_url: str | None,
                   stale_after_s: float) -> None:
    """The devices from their retained heartbeats: state, last seen, bundle (→ the assigned
    one while a rollout is pending; "refused" and the device's reason when it refused the
    assigned one), plan mix, p50/p99 latency, fallbacks, and a cascade's escalation ratio
    (ESC)."""
    import time

    from tandem.devices.fleet._operations import collect_rows
    from tandem.devices.fleet._status import age_text, plan_text

    fleet = _open(fleet_dir, db_url)
    rows = _run(collect_rows(fleet, broker_url=broker_url, stale_after_s=stale_after_s))
    if as_json:
        _say(json.dumps({"fleet": fleet.settings.name,
                         "devices": [r.to_json() for r in rows]}, indent=2))
        return
    now = int(time.time() * 1000)
    from tandem.console import Column, print_lines, print_table

    columns = [Column("DEVICE"), Column("STATE"), Column("SEEN"), Column("BUNDLE", fold=4),
               Column("PLANS", fold=5), Column("P50", justify="right", fold=1),
               Column("P99", justify="right", fold=2), Column("FB", justify="right", fold=3),
               Column("ESC", justify="right", fold=6)]
    table = []
    for r in rows:
        bundle = r.bundle_digest[:8] if r.bundle_digest else "-"
        if r.rollout == "pending":
            bundle += ">" + r.assigned_digest[:8]
        elif r.rollout == "refused":
            bundle += " refused " + r.assigned_digest[:8]
        table.append([r.id, r.state, age_text(r.last_seen_ms, now), bundle,
                      plan_text(r.plan_mix) or "-", f"{r.p50_ms:.1f}" if r.p50_ms else "-",
                      f"{r.p99_ms:.1f}" if r.p99_ms else "-", str(r.fallbacks),
                      f"{100 * r.escalation_ratio:.0f}%" if r.cascading else "-"])
    print_table(columns, table)
    # a refusal's reason in full, on its own line (wrapped on a terminal, nothing cut)
    print_lines(*(f"{r.id} refused bundle {r.assigned_digest[:12]}: {r.refused_reason}"
                  for r in rows if r.rollout == "refused"))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    _say(f"{len(rows)} device(s): " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                                        or "none enrolled"))
    _warn_auth(fleet)


@fleet_command.command("dashboard")
@_common
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--refresh", "refresh_s", type=click.IntRange(1, 3600), default=5,
              show_default=True, help="seconds between page refreshes")
@click.option("--broker", "broker_url", metavar="URL", help="broker URL for the admin client")
def dashboard_command(fleet_dir: str, db_url: str | None, host: str, port: int,
                      refresh_s: int, broker_url: str | None) -> None:
    """Serve the fleet's status as a live web page (and fleet/bundles/ for devices)."""
    from tandem.devices.fleet._dashboard import Dashboard, serve

    fleet = _open(fleet_dir, db_url)
    fleet.clients()  # fail now, in one line, if the registry cannot be read
    dashboard = Dashboard(fleet, broker_url=broker_url, refresh_s=refresh_s)

    def ready(url: str) -> None:
        click.echo(f"dashboard of fleet {fleet.settings.name!r} at {url} (Ctrl-C stops it)",
                   err=True)
        sys.stderr.flush()

    _run(serve(dashboard, host, port, ready))


@fleet_command.command("discover")
@_common
@click.option("--timeout", "timeout_s", type=click.FloatRange(0.1, 600), default=3.0,
              show_default=True, help="seconds to listen")
@click.option("--interface", "interfaces", multiple=True, metavar="ADDR",
              help="browse only on this interface address (repeatable; default: all)")
@click.option("--json", "as_json", is_flag=True)
def discover_command(fleet_dir: str, db_url: str | None, timeout_s: float,
                     interfaces: tuple[str, ...], as_json: bool) -> None:
    """Tandem devices announced on the LAN (mDNS _tandem._tcp), marking the enrolled ones."""
    from tandem.devices.fleet._discover import browse

    fleet = _open(fleet_dir, db_url)
    enrolled = {c["name"] for c in fleet.clients(kind="device")}
    found = browse(timeout_s, interfaces=list(interfaces) or None)
    if as_json:
        _say(json.dumps([{"name": d.name, "device_id": d.device_id,
                          "addresses": list(d.addresses), "port": d.port,
                          "properties": d.properties, "enrolled": d.device_id in enrolled}
                         for d in found], indent=2))
        return
    table = []
    for d in found:
        address = f"{d.addresses[0]}:{d.port}" if d.addresses else f":{d.port}"
        table.append([d.device_id or "?", "yes" if d.device_id in enrolled else "no", address,
                      d.properties.get("profile", ""), d.name])
    from tandem.console import Column, print_table

    print_table([Column("DEVICE"), Column("ENROLLED"), Column("ADDRESS"),
                 Column("PROFILE", fold=1), Column("SERVICE", fold=2, shorten=True)], table)
    _say(f"{len(found)} found, {sum(d.device_id in enrolled for d in found)} enrolled")


@fleet_command.command("check")
@click.argument("enrollment_file", metavar="ENROLLMENT")
@click.option("--wait", "wait_s", type=click.FloatRange(0, 3600), default=0.0, show_default=True,
              help="keep retrying a broker that refuses or is unreachable this many seconds "
                   "(one that is starting or reloading)")
def check_command(enrollment_file: str, wait_s: float) -> None:
    """Connect to the broker with an enrollment file, as the device (or worker) would: over TLS
    with its client certificate and with its password; a device also reads its assignment."""
    from tandem.devices.fleet import load_enrollment
    from tandem.devices.fleet._operations import check_enrollment
    from tandem.protocol.errors import PermissionDenied

    enrollment = load_enrollment(enrollment_file)
    results, assignment = _run(check_enrollment(enrollment, wait_s=wait_s))
    for r in results:
        _say(f"{'ok  ' if r.ok else 'FAIL'} {r.auth:<11} {r.url}  {r.detail}")
    if enrollment.kind == "device":
        if assignment is not None:
            _say(f"assignment: {assignment.model_name} {assignment.model_version} "
                 f"{assignment.bundle_digest[:12]} ({assignment.archive_size} bytes) from "
                 f"{assignment.bundle_uri}")
        else:
            _say("assignment: none yet")
    failed = [r for r in results if not r.ok]
    if failed:
        raise PermissionDenied(f"{len(failed)} of {len(results)} connection(s) failed for "
                               f"{enrollment.id}")
