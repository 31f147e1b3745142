"""Cut-point discovery: boundaries of the topological order with a small, cheap frontier.

Positions. Cuts are counted over the *compute* nodes of ``GraphInfo.nodes`` (the non-constant
ones, in topological order): boundary ``b`` puts the first ``b`` compute nodes in the head.
Constant nodes (Constant, and anything computed only from constants and initializers) take no
position: they can be placed anywhere, so they are copied to whichever side needs them and never
force a boundary. ``Cut.id`` is the boundary ``b``; ``0`` sends the raw inputs (cloud-only) and
``N`` (the number of compute nodes) runs everything locally (no tail).

Frontier. The frontier of boundary ``b`` is the set of non-constant tensors produced before it
(graph inputs count as produced at position 0) and consumed at or after it. A graph output
produced in the head is *carried*: it counts in the frontier (and its bytes), the tail takes it
as an input and passes it through as an output. So the tail always returns every graph output,
and the cloud's reply has one shape whatever the cut; the price is the bytes, which the cost
model sees. Graph inputs still consumed after the boundary are in the frontier too (the edge
sends them as they are).

The sweep over boundaries is incremental: a live set gains the outputs of node ``b - 1`` and
drops the tensors whose last consumer was node ``b - 1``, so all boundaries cost
O(nodes + edges), and only frontiers of at most ``max_frontier`` tensors are materialized.

Order. The frontier is exact for the order ``analyze`` chose (the model's own order where valid,
else the stable Kahn order closest to it) with constants lifted out. For a model with long skips
(U-Net) every boundary between an encoder level and the decoder Concat that reads it carries that
skip: that is a property of the graph, not of the order, and such boundaries have frontier 2+
and are rejected by ``max_frontier=1`` or kept with their honest byte count. What the order can
change is where independent side chains sit (e.g. a Shape of the input computed early); we do
not reorder those (a known gap: a liveness-minimizing schedule could find a few more cuts).

Pareto set. For an edge-cloud split, both axes are costs to minimize: head FLOPs are work on the
weak device and frontier bytes are uplink time. A cut is *dominated* when another has head FLOPs
<= and frontier bytes <= (one strictly less): it makes the edge do at least as much and send at
least as much. Sorted by head FLOPs ascending, the kept cuts therefore send strictly fewer bytes
the more the edge computes: "head cost up, frontier bytes down" as DESIGN.md puts it. (Keeping
the opposite direction, "more local work is better", would let the all-local plan dominate every
split.) ``max_cuts`` caps the interior cuts (the split points); cut 0 and cut N are always
present on top of them. The interior cuts are chosen as a spread over head-FLOPs share (targets
at even fractions of the total).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from tandem.compiler._errors import CompileError
from tandem.compiler._graph import GraphInfo

__all__ = ["Cut", "boundary_frontiers", "find_cuts", "pareto"]


@dataclass(frozen=True)
class Cut:
    """A split point: boundary ``position`` of the compute-node order (``id == position``).

    ``frontier`` lists the tensors that cross from head to tail in production order (graph
    inputs first); ``frontier_bytes`` is their size with symbolic dims = ``GraphInfo.batch``.
    For the all-local cut the frontier is empty (nothing is sent).
    """

    id: int
    position: int
    frontier: tuple[str, ...]
    frontier_bytes: int
    head_flops: int
    tail_flops: int

    @property
    def cloud_only(self) -> bool:
        """Cut 0: the edge sends the raw inputs, the cloud runs the whole model."""
        return self.position == 0

    @property
    def local_only(self) -> bool:
        """The all-local plan: no tail."""
        return self.tail_flops == 0 and not self.frontier and self.position > 0

    @property
    def head_share(self) -> float:
        total = self.head_flops + self.tail_flops
        return self.head_flops / total if total else 0.0


def boundary_frontiers(info: GraphInfo, max_frontier: int) -> Iterator[Cut]:
    """Every interior boundary (1..N-1) whose frontier has 1..``max_frontier`` tensors.

    One incremental pass; each yielded :class:`Cut` carries the exact frontier for that
    boundary of ``info``'s order. Boundaries where a tensor without an inferred dtype or rank
    would cross are skipped (its size is unknown and a part could not declare it).
    """
    compute = info.compute_nodes
    n = len(compute)
    constants = info.constants
    position = {}  # tensor -> boundary index at which it becomes available
    for name in info.inputs:
        position[name] = 0
    for pos, node in enumerate(compute):
        for out in node.outputs:
            position[out] = pos + 1
    # last[t] = index of the last compute node that reads t; graph outputs live to the end.
    last: dict[str, int] = {}
    for pos, node in enumerate(compute):
        for name in node.inputs:
            if name not in constants:
                last[name] = pos
    for name in info.outputs:
        if name in position:
            last[name] = n
    # expire[i]: tensors whose last reader is node i (dead from boundary i + 1 on).
    expire: list[list[str]] = [[] for _ in range(n + 1)]
    for name, pos in last.items():
        if name in position and pos < n:
            expire[pos].append(name)

    # A tensor shape inference could not type (no dtype or rank) has no honest byte count and
    # cannot be declared as a part's input/output: boundaries where one is live are skipped.
    untyped = {
        name for name in position
        if not info.spec(name).dtype or info.spec(name).shape is None
    }
    live: dict[str, int] = {}
    live_bytes = 0
    live_untyped = 0
    for name in info.inputs:
        if name in last:
            size = info.nbytes(name)
            live[name] = size
            live_bytes += size
            live_untyped += name in untyped
    flops_before = 0
    total = sum(node.flops for node in compute)
    for b in range(1, n):
        node = compute[b - 1]
        flops_before += node.flops
        for out in node.outputs:
            if out in last and out not in constants and out not in live:
                size = info.nbytes(out)
                live[out] = size
                live_bytes += size
                live_untyped += out in untyped
        for name in expire[b - 1]:
            size = live.pop(name, None)
            if size is not None:
                live_bytes -= size
                live_untyped -= name in untyped
        if 1 <= len(live) <= max_frontier and not live_untyped:
            yield Cut(
                id=b,
                position=b,
                frontier=tuple(live),
                frontier_bytes=live_bytes,
                head_flops=flops_before,
                tail_flops=total - flops_before,
            )


def pareto(cuts: list[Cut]) -> list[Cut]:
    """The cuts no other cut dominates on (head FLOPs, frontier bytes), both minimized.

    Returned sorted by head FLOPs ascending (so bytes strictly decrease). Ties on both axes keep
    the earliest boundary.
    """
    ordered = sorted(cuts, key=lambda c: (c.head_flops, c.frontier_bytes, c.position))
    kept: list[Cut] = []
    best_bytes: int | None = None
    for cut in ordered:
        if best_bytes is None or cut.frontier_bytes < best_bytes:
            kept.append(cut)
            best_bytes = cut.frontier_bytes
    return kept


def _spread(cuts: list[Cut], k: int, total: int) -> list[Cut]:
    """Pick ``k`` cuts closest to evenly spaced head-FLOPs shares (cuts sorted by FLOPs)."""
    if k <= 0:
        return []
    if len(cuts) <= k:
        return list(cuts)
    chosen: set[int] = set()
    for j in range(1, k + 1):
        target = total * j / (k + 1)
        best = min(
            (i for i in range(len(cuts)) if i not in chosen),
            key=lambda i: (abs(cuts[i].head_flops - target), cuts[i].position),
        )
        chosen.add(best)
    return [cuts[i] for i in sorted(chosen)]


def find_cuts(info: GraphInfo, max_frontier: int = 2, max_cuts: int = 8) -> list[Cut]:
    """Candidate cuts of ``info``: cut 0, a Pareto-optimal spread of splits, and all-local.

    ``max_cuts`` caps the interior cuts; cut 0 and all-local come on top (up to max_cuts + 2).
    Returned in position order.
    """
    if max_frontier < 1:
        raise CompileError(f"max_frontier must be >= 1, got {max_frontier}")
    if max_cuts < 1:
        raise CompileError(f"max_cuts must be >= 1, got {max_cuts}")
    compute = info.compute_nodes
    n = len(compute)
    total = sum(node.flops for node in compute)
    first = Cut(
        id=0,
        position=0,
        frontier=info.inputs,
        frontier_bytes=sum(info.nbytes(name) for name in info.inputs),
        head_flops=0,
        tail_flops=total,
    )
    if n == 0:
        return [first]
    local = Cut(id=n, position=n, frontier=(), frontier_bytes=0, head_flops=total, tail_flops=0)
    # Interior cuts must beat cut 0 on bytes (cut 0 has the least head work possible).
    front = [c for c in pareto([first, *boundary_frontiers(info, max_frontier)]) if c.position]
    interior = _spread(front, max_cuts, total)
    return [first, *sorted(interior, key=lambda c: c.position), local]
