"""The ``tandem`` command: a dispatcher that loads each subcommand from the package that owns it.

Subcommands are declared as entry points in the ``tandem.commands`` group (pyproject.toml), so
this module imports no other package of ours. A command module is imported only to run it or to
list it in ``--help``; command modules keep their own heavy imports inside the command body.

Exit status and messages, one rule for every command:

* 0: done. A closed stdout (``tandem devices | head -1``) is a normal end too: no traceback,
  no "Broken pipe" noise, status 0.
* 1: the user's or the world's problem, as one line ``error: <message>``: a
  :class:`~tandem.protocol.errors.TandemError` (an existing output, a missing input file, a bad
  model, a missing extra…), or the system refusing a file operation (permission denied, a
  read-only file system, a full disk), said in plain words.
* 2: a malformed command line (click's usage message).
* 70: our bug: one line, and the traceback only with ``TANDEM_DEBUG=1``.
"""

from __future__ import annotations

import errno
import os
import select
import sys
from importlib.metadata import entry_points

import click

from tandem.protocol.errors import MissingDependency, TandemError
from tandem.protocol.lazy import install_command

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_INTERNAL = 70

# File-system refusals that are the user's environment, not our bug.
_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.ELOOP}


class _OutputClosed(Exception):
    """The reader of stdout went away (``| head``): the command ends normally."""


class _OtherBrokenPipe(Exception):
    """A broken pipe that is not stdout (a socket): carried past click, which would make any
    EPIPE an ``exit 1``, to be reported as what it is."""


def _command_entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group="tandem.commands")}


def _stdout_gone() -> bool:
    """Whether stdout's reader went away (poll reports an error on a pipe or socket whose other
    end is closed), so a BrokenPipeError from anything else (a socket) is not mistaken for it."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # no real stdout (captured, embedded)
        return False
    if not hasattr(select, "poll"):  # pragma: no cover - Windows: no way to ask
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _closed_pipe_is_an_end(fn):
    """Run ``fn``, flushing stdout inside, so a closed stdout surfaces here (click would turn
    it into ``exit 1``) and becomes :class:`_OutputClosed`."""

    def wrapper(*args, **kwargs):
        try:
            rv = fn(*args, **kwargs)
            sys.stdout.flush()
            return rv
        except BrokenPipeError as exc:
            if _stdout_gone():
                raise _OutputClosed from exc
            raise _OtherBrokenPipe from exc

    return wrapper


class _LazyGroup(click.Group):
    @_closed_pipe_is_an_end
    def make_context(self, *args, **kwargs) -> click.Context:  # prints --help
        return super().make_context(*args, **kwargs)

    @_closed_pipe_is_an_end
    def invoke(self, ctx: click.Context):  # runs the command (and prints its --help)
        return super().invoke(ctx)

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
        f"install the extra for it, e.g. {install_command('cpu')}"
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
    except _OutputClosed:
        _discard_stdout()
        return 0
    except _OtherBrokenPipe as exc:
        return _internal(exc.__cause__ or exc)
    except TandemError as exc:
        click.echo(f"error: {exc}", err=True)
        return EXIT_ERROR
    except OSError as exc:
        if exc.errno not in _USER_ERRNOS or os.environ.get("TANDEM_DEBUG"):
            return _internal(exc)
        click.echo(f"error: {_os_error_words(exc)}", err=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as exc:  # our bug: say so in one line
        return _internal(exc)
    return rv if isinstance(rv, int) else 0


def _internal(exc: BaseException) -> int:
    if os.environ.get("TANDEM_DEBUG"):
        raise exc
    click.echo(
        f"internal error: {type(exc).__name__}: {exc} (set TANDEM_DEBUG=1 for a traceback)",
        err=True,
    )
    return EXIT_INTERNAL


def _os_error_words(exc: OSError) -> str:
    """``cannot write out/b: Read-only file system`` rather than ``[Errno 30] …``."""
    what = exc.strerror or str(exc)
    name = exc.filename
    if name is None:
        return what
    path = os.fspath(name)
    parent = os.path.dirname(path)
    # tempfile and our writers name the hidden staging file, not what the user asked for
    if os.path.basename(path).startswith(".") and parent:
        path = parent
    return f"cannot write {path}: {what}" if exc.errno in (
        errno.EROFS, errno.ENOSPC, errno.EDQUOT) else f"{path}: {what}"


def _discard_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush finds nothing to complain of."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (embedded): nothing left to flush anyway
        pass


@click.command(name="bench", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_command(name: str, args: tuple[str, ...]) -> None:
    """Run benchmark NAME from a source checkout (python -m benchmarks.NAME ARGS...).

    Benchmarks: protocol, compile, backend, broker_nodelay. ARGS go to the benchmark (--quick,
    --json PATH); a --quick run writes out/benchmarks/NAME.json, never benchmarks/results/.
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
