"""``tandem devices``: list device profiles, mark the detected local device, or print it.

Light at import (click only); rich is imported when the table is printed (tandem.console: fitted
to a terminal, plain and complete in a pipe).
"""

from __future__ import annotations

import json

import click

__all__ = ["devices_command"]


def _fmt(value, unit: str = "", sparse: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{value:g}{unit}"
    return text + " (sparse)" if sparse else text


@click.command(name="devices")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--detect", "detect_only", is_flag=True, help="print only the detected profile")
@click.option("--profile", "override", metavar="ID",
              help="use this profile instead of detecting (also: TANDEM_DEVICE_PROFILE)")
def devices_command(as_json: bool, detect_only: bool, override: str | None) -> None:
    """List the device profiles Tandem knows and mark this machine's."""
    from tandem.devices.detect import detect
    from tandem.devices.profiles import load_profiles

    found = detect(override)
    if detect_only:
        if as_json:
            click.echo(json.dumps({"profile": found.profile.to_dict(), "source": found.source,
                                   "detail": found.detail}, indent=2))
        else:
            p = found.profile
            click.echo(f"{p.id}\t{p.name}\t(detected by {found.source}: {found.detail})")
        return
    profiles = load_profiles()
    if as_json:
        click.echo(json.dumps({"detected": found.profile.id, "source": found.source,
                               "profiles": [p.to_dict() for p in profiles.values()]}, indent=2))
        return
    from tandem.console import Column, console, print_lines, print_table

    columns = [Column(""), Column("id"), Column("kind", fold=1), Column("CC"),
               Column("memory", justify="right"), Column("FP16 TFLOPS", justify="right"),
               Column("INT8 TOPS", justify="right"), Column("DLA", justify="right"),
               Column("backend", fold=2)]
    rows = [
        ["*" if p.id == found.profile.id else "", p.id, p.kind, p.compute_capability or "-",
         _fmt(p.memory_gb, " GB"), _fmt(p.fp16_tflops, sparse=p.fp16_sparse),
         _fmt(p.int8_tops, sparse=p.int8_sparse), str(p.dla_cores), p.default_backend]
        for p in profiles.values()
    ]
    out = console()
    print_table(columns, rows, title="Tandem device profiles", out=out)
    print_lines(f"* detected: {found.profile.id} (by {found.source}: {found.detail})", out=out)
