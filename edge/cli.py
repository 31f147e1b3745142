"""``tandem edge``: the edge daemon's commands.

    tandem edge run --bundle B --device-id ID [--broker mqtt[s]://HOST:PORT] [--api-port P]
                    [--config FILE] [--profile DEVICE_PROFILE] [--enroll FILE] ...

Every option also comes from ``TANDEM_<OPTION>`` environment variables and the ``[edge]``
table of a TOML config file (precedence: option > environment > file > enrollment > default;
see ``tandem.edge._config``). Logs are one line per event on stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

__all__ = ["edge_command"]


@click.group(name="edge", context_settings={"help_option_names": ["-h", "--help"]})
def edge_command() -> None:
    """The edge daemon: serve a bundle on this device (local KServe v2 API, split planner,
    offload with fallback, durable spool)."""


def _enrollment_values(path: Path) -> tuple[dict[str, Any], Any]:
    """Config values from a fleet enrollment file, and the enrollment itself."""
    try:
        from tandem.devices.fleet import load_enrollment
    except ImportError as exc:
        from tandem.protocol.errors import MissingDependency

        raise MissingDependency(f"--enroll needs tandem.devices.fleet ({exc})") from exc
    enrollment = load_enrollment(path)
    if enrollment.kind != "device":
        from tandem.protocol.errors import InvalidArgument

        raise InvalidArgument(f"{path} enrolls a {enrollment.kind}, not a device")
    values: dict[str, Any] = {"device_id": enrollment.id}
    if enrollment.profile:
        values["profile"] = enrollment.profile
    return values, enrollment


@edge_command.command(name="run", context_settings={"max_content_width": 100})
@click.option("--bundle", type=click.Path(path_type=Path), default=None,
              help="Bundle directory or archive to serve (else the assigned one).")
@click.option("--device-id", default=None, help="This device's id (topic-safe).")
@click.option("--broker", default=None,
              help="mqtt[s]://[user[:pass]@]HOST[:PORT]; default: a broker advertised over "
                   "mDNS (_mqtt._tcp), else mqtt://127.0.0.1:1883.")
@click.option("--api-port", type=int, default=None, help="Local API port (default 8000).")
@click.option("--api-host", default=None, help="Local API address (default 127.0.0.1).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="TOML file with an [edge] table (any option, by its name).")
@click.option("--profile", default=None,
              help="Device profile id (see tandem devices); default: detected.")
@click.option("--enroll", type=click.Path(path_type=Path), default=None,
              help="Fleet enrollment file: device id, broker, TLS, bundle-signing key.")
@click.option("--public-key", type=click.Path(path_type=Path), default=None,
              help="Bundles must be signed by this ed25519 public key.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="Profiles, spool, engines, bundles (default "
                   "$XDG_STATE_HOME/tandem/edge/<device id>).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]),
              default=None, help="Execution backend (default auto).")
@click.option("--mode", default=None,
              help="Default mode of requests that name none: "
                   "auto|local|cloud|cascade|split:<cut>.")
@click.option("--deadline-ms", type=float, default=None,
              help="Default deadline of requests that name none (default 1000).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default=None)
def run_command(config_file: Path | None, enroll: Path | None, **options: Any) -> None:
    """Run the edge daemon until SIGINT/SIGTERM."""
    import os

    from tandem.edge._config import load_config
    from tandem.edge._serve import run

    enroll = enroll or (Path(os.environ["TANDEM_ENROLL"]) if os.environ.get("TANDEM_ENROLL")
                        else None)
    enrollment_values: dict[str, Any] = {}
    enrollment = None
    if enroll is not None:
        enrollment_values, enrollment = _enrollment_values(enroll)
    config = load_config(options, config_file=config_file, enrollment=enrollment_values)
    if config.bundle is None and enrollment is None and config.public_key is None:
        from tandem.protocol.errors import InvalidArgument

        raise InvalidArgument("no bundle: give --bundle PATH (or --enroll FILE to wait for an "
                              "assignment)")
    if config.bundle is not None and not config.bundle.exists():
        from tandem.protocol.errors import NotFound

        raise NotFound(f"--bundle {config.bundle}: no such file or directory")
    run(config, enrollment=enrollment)
