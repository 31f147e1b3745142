"""The benchmarks' pictures: a few chart kinds, PNG files written atomically next to the JSON.

matplotlib comes with the ``bench`` extra (``pip install -e '.[bench]'``); it is imported when a
chart is drawn, with the Agg backend (no display needed). Every chart says what it shows in
its title and axis labels, and carries a footnote (machine, caveats) when given one.

* :func:`grouped_bars`: one group per category (a link), one bar per series (a plan), with
  markers for chosen bars (``auto``, the oracle) — latency per plan per link.
* :func:`lines`: y against x for several series, optional error bars — fleet throughput and
  latency against devices, per worker count; measured against configured.
* :func:`timeline`: a step series (the link's rate) over time with events on a second axis (the
  plan chosen per request) — plan over time under a changing link.
* :func:`heatmap`: a value per (row, column) cell with the numbers written in — regret per cell.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from tandem.protocol.lazy import require

__all__ = ["grouped_bars", "heatmap", "lines", "timeline"]

_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3",
           "#8C8C8C", "#CCB974", "#64B5CD"]


def _pyplot():
    matplotlib = require("matplotlib", "bench")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _bottom(fig, footnote: str | None) -> float:
    """The share of the figure's height the footnote needs below the axes."""
    if not footnote:
        return 0.0
    chars_per_line = max(40, int(fig.get_figwidth() * 17))
    lines = 1 + len(footnote) // chars_per_line
    return min(0.3, (0.18 * lines + 0.1) / fig.get_figheight())


def _save(fig, path: str | Path, footnote: str | None) -> Path:
    """Write the figure to ``path`` (PNG) through a temporary file, then close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if footnote:
        fig.text(0.01, 0.005, footnote, fontsize=7, color="#555555", ha="left", va="bottom",
                 wrap=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _pyplot().close(fig)
    return path


def grouped_bars(path: str | Path, groups: Sequence[str], series: Sequence[str],
                 values: Mapping[tuple[str, str], float], *, title: str, ylabel: str,
                 errors: Mapping[tuple[str, str], float] | None = None,
                 marks: Mapping[str, Mapping[str, str]] | None = None, log_y: bool = False,
                 footnote: str | None = None) -> Path:
    """Bars of ``values[(group, series)]`` (missing pairs are left out); ``errors`` draws a
    whisker up to that value (a p99); ``marks[label][group] = series`` puts a marker labelled
    ``label`` on that bar (e.g. ``{"auto": {...}, "oracle": {...}}``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) * max(1, len(series)) / 3), 4.2))
    width = 0.8 / max(1, len(series))
    for j, name in enumerate(series):
        xs, ys, ups = [], [], []
        for i, group in enumerate(groups):
            if (group, name) in values:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(values[(group, name)])
                top = (errors or {}).get((group, name))
                ups.append(max(0.0, top - ys[-1]) if top is not None else 0.0)
        if not xs:
            continue
        ax.bar(xs, ys, width, label=name, color=_COLORS[j % len(_COLORS)],
               yerr=[[0] * len(ups), ups] if errors else None, capsize=2)
    symbols = ["v", "*", "o", "D"]
    for k, (label, chosen) in enumerate((marks or {}).items()):
        xs, ys = [], []
        for i, group in enumerate(groups):
            name = chosen.get(group)
            if name in series and (group, name) in values:
                j = list(series).index(name)
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(values[(group, name)])
        ax.scatter(xs, [y * (1.25 if log_y else 1.04) for y in ys], marker=symbols[k % 4],
                   s=70, color="black" if k == 0 else "#C44E52", zorder=5, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=min(4, len(series) + len(marks or {})), loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout(rect=(0, _bottom(fig, footnote), 1, 1))
    return _save(fig, path, footnote)


def lines(path: str | Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
          title: str, xlabel: str, ylabel: str,
          errors: Mapping[str, Sequence[float]] | None = None, diagonal: bool = False,
          log_x: bool = False, log_y: bool = False, footnote: str | None = None,
          reference: Sequence[str] = (), panels: Sequence[Mapping] | None = None) -> Path:
    """``series[name] = (xs, ys)`` as lines with markers; ``errors[name]`` draws whiskers up to
    those values (a p99). ``diagonal``: the y = x line (measured against configured).
    ``reference``: names of series drawn as dashed grey lines beneath the others (what was
    offered, a target), so a measured line on top of one stays visible.
    ``panels``: more charts side by side, each a dict of this function's keyword arguments
    (``series``, ``title``, ``xlabel``, ``ylabel``, ``errors``, ``diagonal``, ``log_x``,
    ``log_y``)."""
    plt = _pyplot()
    specs = [dict(series=series, title=title, xlabel=xlabel, ylabel=ylabel, errors=errors,
                  diagonal=diagonal, log_x=log_x, log_y=log_y, reference=reference),
             *(panels or [])]
    fig, axes = plt.subplots(1, len(specs), figsize=(5.2 * len(specs), 4.0), squeeze=False)
    for ax, spec in zip(axes[0], specs, strict=True):
        lows, highs = [], []
        for k, (name, (xs, ys)) in enumerate(spec["series"].items()):
            err = (spec.get("errors") or {}).get(name)
            order = sorted(range(len(xs)), key=lambda i: xs[i])  # a line runs left to right
            xs, ys = [xs[i] for i in order], [ys[i] for i in order]
            err = None if err is None else [err[i] for i in order]
            color = _COLORS[k % len(_COLORS)]
            if name in spec.get("reference", ()):
                ax.plot(xs, ys, "--", color="#888888", linewidth=2.5, label=name, zorder=1)
            elif err is not None:
                ups = [max(0.0, e - y) for e, y in zip(err, ys, strict=True)]
                ax.errorbar(xs, ys, yerr=[[0] * len(ups), ups], marker="o", capsize=3,
                            label=name, color=color)
            else:
                ax.plot(xs, ys, marker="o", label=name, color=color)
            lows += list(xs) + list(ys)
            highs += list(xs) + list(ys)
        if spec.get("diagonal") and lows:
            lo, hi = min(lows), max(highs)
            ax.plot([lo, hi], [lo, hi], "--", color="#888888", linewidth=1, label="y = x")
        ax.set_title(spec["title"], fontsize=10)
        ax.set_xlabel(spec["xlabel"])
        ax.set_ylabel(spec["ylabel"])
        if spec.get("log_x"):
            ax.set_xscale("log")
        if spec.get("log_y"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout(rect=(0, _bottom(fig, footnote), 1, 1))
    return _save(fig, path, footnote)


def timeline(path: str | Path, *, step_x: Sequence[float], step_y: Sequence[float],
             step_label: str, events_x: Sequence[float], events_y: Sequence[float],
             events_kind: Sequence[str], events_label: str, title: str,
             xlabel: str = "time (s)", event_order: Sequence[str] | None = None,
             extra_steps: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
             footnote: str | None = None) -> Path:
    """A step line (``step_y`` from each ``step_x`` on, e.g. the link's Mbit/s) on the left
    axis, and events (e.g. each request's latency at its time) on the right axis, coloured by
    ``events_kind`` (the plan that ran it). ``extra_steps[label] = (xs, ys)``: more step
    lines on the left axis, dashed (e.g. what the device estimated the rate to be)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11.0, 4.2))
    if step_x:
        end = max([*step_x, *events_x]) if events_x else max(step_x)
        ax.step([*step_x, end], [*step_y, step_y[-1]], where="post", color="#333333",
                linewidth=1.5, label=step_label)
    for k, (label, (xs, ys)) in enumerate((extra_steps or {}).items()):
        if xs:
            ax.step(list(xs), list(ys), where="post", linestyle="--", linewidth=1.2,
                    color=["#888888", "#8172B3", "#937860"][k % 3], label=label)
    ax.set_ylabel(step_label)
    ax.set_xlabel(xlabel)
    ax.set_yscale("log")
    right = ax.twinx()
    kinds = list(event_order or dict.fromkeys(events_kind))
    for k, kind in enumerate(kinds):
        xs = [x for x, c in zip(events_x, events_kind, strict=True) if c == kind]
        ys = [y for y, c in zip(events_y, events_kind, strict=True) if c == kind]
        if xs:
            right.scatter(xs, ys, s=10, color=_COLORS[k % len(_COLORS)], label=kind, zorder=3)
    right.set_ylabel(events_label)
    right.set_yscale("log")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.1, 1.0),
              markerscale=2)  # beside the axes: the points may be anywhere
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, _bottom(fig, footnote), 1, 1))
    return _save(fig, path, footnote)


def heatmap(path: str | Path, rows: Sequence[str], columns: Sequence[str],
            values: Mapping[tuple[str, str], float], *, title: str, unit: str = "",
            threshold: float | None = None, footnote: str | None = None) -> Path:
    """``values[(row, column)]`` as coloured cells with the number written in; a cell above
    ``threshold`` is outlined in red (a missed target)."""
    plt = _pyplot()
    import numpy as np

    grid = np.full((len(rows), len(columns)), np.nan)
    for i, r in enumerate(rows):
        for j, c in enumerate(columns):
            if (r, c) in values:
                grid[i, j] = values[(r, c)]
    fig, ax = plt.subplots(figsize=(1.3 * len(columns) + 2.5, 0.6 * len(rows) + 1.6))
    finite = grid[np.isfinite(grid)]
    top = float(finite.max()) if finite.size else 1.0
    ax.imshow(grid, cmap="Reds", vmin=0, vmax=max(top, threshold or 0, 1e-9), aspect="auto")
    for i in range(len(rows)):
        for j in range(len(columns)):
            v = grid[i, j]
            if np.isfinite(v):
                ax.text(j, i, f"{v:.3g}{unit}", ha="center", va="center", fontsize=8)
                if threshold is not None and v > threshold:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False,
                                               edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(title, fontsize=10)
    fig.tight_layout(rect=(0, _bottom(fig, footnote), 1, 1))
    return _save(fig, path, footnote)
