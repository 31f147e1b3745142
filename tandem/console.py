"""What the ``tandem`` commands print: tables that fit a terminal and lose nothing in a pipe.

On a terminal (as rich decides it: a TTY, or ``FORCE_COLOR`` / ``TTY_COMPATIBLE=1``) a table is
drawn at the terminal's width (``COLUMNS``) and never wraps a value: long names are shortened in
the middle (``/encoder/l…/MatMul_output_0``) and the least important columns are left out, and a
note under the table says so. Anywhere else (a pipe, a file) the table is plain aligned columns
with every value in full, however wide that is; ``--json`` is there for programs.

A closed stdout (``tandem devices | head -1``) is a normal end: :func:`console` returns a rich
console that raises :class:`BrokenPipeError` (rich's own default is ``SystemExit(1)``), and the
dispatcher (:mod:`tandem.cli`) ends such a command quietly with status 0.

This module imports no package of ours (rich only, and only when used), so the CLI of every
package may use it without bending the dependency direction.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

__all__ = ["Column", "console", "print_lines", "print_table", "shorten_middle"]

#: A cell: one value, or a list of names (shortened one by one, shown joined by ", ").
Cell = str | Sequence[str]

_READABLE = 24  # on a terminal, names are shortened to this before columns are left out
_ELLIPSIS = "…"


@dataclass(frozen=True)
class Column:
    """One column of a table.

    ``fold``: 0 = always shown; a column with a higher number is left out first when a terminal
    is too narrow (ties: the rightmost first). ``shorten``: values are names that may be
    shortened in the middle on a narrow terminal, down to ``min_width`` characters each; other
    values are never shortened.
    """

    header: str
    justify: Literal["left", "right"] = "left"
    fold: int = 0
    shorten: bool = False
    min_width: int = 12


def shorten_middle(text: str, width: int) -> str:
    """``text`` if it fits in ``width`` characters, else its start and end around an ellipsis
    (the end gets the extra character: a name's suffix tells more)."""
    if len(text) <= width:
        return text
    if width <= 1:
        return _ELLIPSIS[:width]
    keep = width - 1
    tail = (keep + 1) // 2
    return text[: keep - tail] + _ELLIPSIS + text[len(text) - tail:]


_CONSOLE_CLASS = None


def console(*, stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr) whose broken pipe raises :class:`BrokenPipeError`."""
    global _CONSOLE_CLASS
    if _CONSOLE_CLASS is None:
        from rich.console import Console

        class _Console(Console):
            def on_broken_pipe(self) -> None:
                self.quiet = True
                raise BrokenPipeError(errno.EPIPE, "output closed")

        _CONSOLE_CLASS = _Console
    return _CONSOLE_CLASS(stderr=stderr)


def print_lines(*lines: str, out: Console | None = None, style: str | None = None) -> None:
    """Print text lines as they are (no markup): word-wrapped at a terminal's width, never
    wrapped anywhere else (rich would wrap a pipe at 80 columns)."""
    from rich.text import Text

    out = out or console()
    for line in lines:
        out.print(Text(line, style=style or ""), soft_wrap=not out.is_terminal)


def _cell_text(cell: Cell, limit: int | None) -> str:
    names = [cell] if isinstance(cell, str) else list(cell)
    if limit is not None:
        names = [shorten_middle(n, limit) for n in names]
    return ", ".join(names)


def _width(text: str) -> int:
    from rich.cells import cell_len

    return cell_len(text)


def print_table(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], *,
                title: str | None = None, out: Console | None = None) -> None:
    """Print a table: fitted to a terminal, or plain and complete anywhere else."""
    out = out or console()
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"row has {len(row)} cells for {len(columns)} columns")
    if out.is_terminal:
        _print_fitted(columns, rows, title, out)
    else:
        _print_plain(columns, rows, title, out)


def _print_plain(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], title: str | None,
                 out: Console) -> None:
    grid = [[c.header for c in columns]] + [[_cell_text(c, None) for c in row] for row in rows]
    widths = [max(_width(r[i]) for r in grid) for i in range(len(columns))]
    lines = [title] if title else []
    for r in grid:
        cells = []
        for i, (text, col) in enumerate(zip(r, columns, strict=True)):
            pad = " " * (widths[i] - _width(text))
            last = i == len(columns) - 1
            cells.append(pad + text if col.justify == "right" else text + ("" if last else pad))
        lines.append("  ".join(cells).rstrip())
    print_lines(*lines, out=out)


def _build(columns, rows, shown, limits, title, wrap: bool = False):
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False, collapse_padding=True)
    for i in shown:
        col = columns[i]
        table.add_column(col.header, justify=col.justify, no_wrap=not wrap,
                         overflow="fold" if wrap else "ellipsis")
    for row in rows:
        table.add_row(*(Text(_cell_text(row[i], limits.get(i))) for i in shown))
    return table


def _print_fitted(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], title: str | None,
                  out: Console) -> None:
    from rich.measure import Measurement

    width = out.width
    shown = list(range(len(columns)))
    limits: dict[int, int] = {}
    shortenable = [i for i, c in enumerate(columns) if c.shorten]

    def natural(i: int) -> int:  # longest single name of a shortenable column, as shown now
        names = [n for row in rows for n in ([row[i]] if isinstance(row[i], str) else row[i])]
        return max((len(n) for n in names), default=0)

    def overflow() -> int:
        table = _build(columns, rows, shown, limits, None)
        wide = out.options.update_width(1 << 20)  # rich caps a measurement at the width given
        return Measurement.get(out, wide, table).maximum - width

    def fits() -> bool:
        return overflow() <= 0

    def shrink(floor: int) -> None:  # shorten names, widest first, only as much as needed
        while (over := overflow()) > 0:
            candidates = [i for i in shortenable if i in shown
                          and limits.get(i, natural(i)) > max(floor, columns[i].min_width)]
            if not candidates:
                return
            widest = max(candidates, key=lambda i: limits.get(i, natural(i)))
            current = limits.get(widest, natural(widest))
            limits[widest] = max(floor, columns[widest].min_width, current - over)

    def settle() -> None:  # names as long as the shown columns allow, down to a readable length
        limits.clear()
        shrink(_READABLE)

    # 1. names shortened to a readable length, 2. the folding columns left out (names get
    # their length back), 3. names shorter still, 4. wrap: a value is never cut
    settle()
    dropped: list[int] = []
    order = sorted((i for i, c in enumerate(columns) if c.fold > 0),
                   key=lambda i: (columns[i].fold, i), reverse=True)
    while not fits() and order:
        victim = order.pop(0)
        shown.remove(victim)
        dropped.append(victim)
        settle()
    shrink(0)
    wrap = not fits()  # a terminal narrower than the essential columns: wrap, never cut
    out.print(_build(columns, rows, shown, limits, title, wrap=wrap))
    shortened = any(limits.get(i, 10**9) < natural(i) for i in shortenable if i in shown)
    notes = []
    if dropped:
        notes.append("left out: " + ", ".join(columns[i].header for i in sorted(dropped)))
    if shortened:
        notes.append("long names shortened in the middle")
    if notes:
        print_lines(f"({'; '.join(notes)} at {width} columns; pipe the output or use --json "
                    "for every value)", out=out, style="dim")
