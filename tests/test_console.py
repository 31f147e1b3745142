"""tandem.console: tables fitted to a terminal without cutting a value, complete in a pipe."""

from __future__ import annotations

import ast
import contextlib
import io
import os
from pathlib import Path

import pytest
from rich.cells import cell_len
from rich.console import Console

from tandem.console import Column, console, print_lines, print_table, shorten_middle

ROOT = Path(__file__).resolve().parents[1]

COLUMNS = [Column("id", justify="right"), Column("name", shorten=True),
           Column("bytes", justify="right"), Column("detail", fold=1),
           Column("extra", fold=2), Column("more", fold=2)]
NAME = "/encoder/layers.11/self_attention/output_projection/MatMul_output_0"
ROWS = [["1", NAME, "12.0 KiB", "a fairly long detail value", "x" * 12, "y" * 12],
        ["22", ["short", NAME.replace("11", "12")], "128 B", "d", "e", "f"]]


def _terminal(width: int) -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=width, color_system=None,
                   legacy_windows=False)


def _pipe() -> Console:
    return Console(file=io.StringIO(), force_terminal=False, width=80)


@pytest.mark.parametrize("text, width, shown", [
    ("abcdefghij", 10, "abcdefghij"), ("abcdefghij", 9, "abcd…ghij"), ("abcdefghij", 6, "ab…hij"),
    ("abcdefghij", 1, "…"), ("", 4, ""),
])
def test_shorten_middle(text, width, shown):
    assert shorten_middle(text, width) == shown
    assert len(shorten_middle(text, width)) <= max(width, 0)


def test_piped_tables_are_complete_whatever_their_width():
    out = _pipe()
    print_table(COLUMNS, ROWS, title="t", out=out)
    text = out.file.getvalue()
    lines = text.splitlines()
    assert lines[0] == "t"
    assert "…" not in text and NAME in text and NAME.replace("11", "12") in text
    assert max(len(ln) for ln in lines) > 80  # wider than the pretend width: nothing wrapped
    assert len(lines) == 4  # title, header, two rows: no line was wrapped
    header = lines[1]
    # right-justified numbers end where their header ends; left-justified start with theirs
    assert lines[2].index("12.0 KiB") + len("12.0 KiB") == header.index("bytes") + len("bytes")
    assert lines[3].index("short, ") == header.index("name")


def test_a_table_that_fits_is_drawn_as_it_is():
    out = _terminal(200)
    print_table(COLUMNS, ROWS, out=out)
    text = out.file.getvalue()
    assert NAME in text and "…" not in text and "left out" not in text


@pytest.mark.parametrize("width, left_out", [
    (90, "more"), (80, "extra, more"), (60, "detail, extra, more"),
])
def test_a_narrow_terminal_loses_columns_and_name_middles_never_values(width, left_out):
    out = _terminal(width)
    print_table(COLUMNS, ROWS, title="t", out=out)
    text = out.file.getvalue()
    lines = text.splitlines()
    header, first = lines[1], lines[3]
    assert max(cell_len(ln) for ln in lines) <= width, text
    assert "12.0 KiB" in first and "128 B" in text  # values are never cut
    note = " ".join(text.split("(")[-1].split())
    # the highest fold first, the rightmost of a tie first
    assert note.startswith(f"left out: {left_out};"), note
    for col in ("detail", "extra", "more"):
        assert (col in header.split()) == (col not in left_out)
    assert "/encoder/" in first and "_output_0" in first  # a name keeps its ends
    assert "long names shortened in the middle" in note


def test_narrower_than_the_essential_columns_wraps_rather_than_cuts():
    out = _terminal(24)
    cols = [Column("id"), Column("value", justify="right")]
    print_table(cols, [["1", "1234567890123456789012345"]], out=out)
    text = out.file.getvalue()
    assert "…" not in text
    assert "".join(text.split()).count("1234567890123456789012345") == 1


def test_rows_must_match_the_columns():
    with pytest.raises(ValueError, match="2 cells for 6 columns"):
        print_table(COLUMNS, [["1", "2"]], out=_pipe())


def test_lines_are_not_wrapped_in_a_pipe_and_wrapped_on_a_terminal():
    long = "word " * 40
    out = _pipe()
    print_lines(long.strip(), out=out)
    assert out.file.getvalue() == long.strip() + "\n"
    out = _terminal(40)
    print_lines(long.strip(), out=out)
    assert all(cell_len(ln) <= 40 for ln in out.file.getvalue().splitlines())


def test_markup_in_values_is_shown_as_text():
    out = _pipe()
    print_table([Column("name")], [["[bold]x[/bold]"]], out=out)
    print_lines("[red]y[/red]", out=out)
    assert "[bold]x[/bold]" in out.file.getvalue() and "[red]y[/red]" in out.file.getvalue()


def test_a_closed_pipe_raises_broken_pipe_not_system_exit():
    read_end, write_end = os.pipe()
    os.close(read_end)
    out = console()
    f = os.fdopen(write_end, "w")
    out.file = f
    try:
        with pytest.raises(BrokenPipeError):  # rich's own default: SystemExit(1)
            out.print("hello")
    finally:
        with contextlib.suppress(BrokenPipeError):
            f.close()


def test_the_module_imports_no_package_of_ours():
    tree = ast.parse((ROOT / "tandem" / "console.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] == "tandem"], names
