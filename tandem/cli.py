"""The ``tandem`` command: a dispatcher that loads each subcommand from the package that owns it.

Subcommands are declared as entry points in the ``tandem.commands`` group (pyproject.toml), so
this module imports no other package of ours. A command module is imported only to run it or to
list it in ``--help``; command modules keep their own heavy imports inside the command body.

Errors: a :class:`~tandem.protocol.errors.TandemError` prints one line ``error: <message>`` and
exits 1
(2 for usage errors, as click does); anything else is our bug: one line, exit 70, and the
traceback only with ``TANDEM_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points

import click

from tandem.protocol.errors import MissingDependency, TandemError

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_INTERNAL = 70


def _command_entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group="tandem.commands")}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_command_entry_points()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is not None:
            return cmd
        ep = _command_entry_points().get(name)
        if ep is None:
            return None
        try:
            return ep.load()
        except ImportError as exc:
            return _unavailable_command(name, exc)


def _unavailable_command(name: str, exc: ImportError) -> click.Command:
    missing = MissingDependency(
        f"'tandem {name}' needs a package that is not installed ({exc}); "
        "install the extra for it, e.g. pip install 'tandem-rt[cpu]'"
    )

    @click.command(name=name, help=f"(unavailable: {exc})", context_settings={
        "ignore_unknown_options": True, "allow_extra_args": True})
    def _cmd() -> None:
        raise missing

    return _cmd


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tandem-rt", prog_name="tandem")
def cli() -> None:
    """Tandem: split ONNX models between edge devices and cloud GPUs over MQTT."""


def main(argv: list[str] | None = None) -> int:
    """Console entry point; never lets a traceback reach the user unless TANDEM_DEBUG=1."""
    try:
        # without standalone mode click returns an Exit's code instead of raising it
        rv = cli.main(args=argv, prog_name="tandem", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except TandemError as exc:
        click.echo(f"error: {exc}", err=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as exc:  # our bug: say so in one line
        if os.environ.get("TANDEM_DEBUG"):
            raise
        click.echo(
            f"internal error: {type(exc).__name__}: {exc} (set TANDEM_DEBUG=1 for a traceback)",
            err=True,
        )
        return EXIT_INTERNAL
    return rv if isinstance(rv, int) else 0


@click.command(name="bench", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_command(name: str, args: tuple[str, ...]) -> None:
    """Run benchmark NAME from a source checkout (python -m benchmarks.NAME ARGS...).

    Benchmarks: protocol, compile, backend. ARGS go to the benchmark (--quick, --json PATH).
    """
    import importlib
    import re
    from pathlib import Path

    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise click.BadParameter(f"not a benchmark name: {name!r}")
    if (Path.cwd() / "benchmarks" / "__init__.py").is_file() and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as exc:
        raise click.ClickException(
            f"no benchmark {name!r} ({exc}; benchmarks run from the root of a source checkout)"
        ) from exc
    if not hasattr(module, "main"):
        raise click.ClickException(f"benchmarks.{name} is not a runnable benchmark")
    rc = module.main(list(args))
    if rc:
        raise click.exceptions.Exit(rc)


if __name__ == "__main__":
    sys.exit(main())
