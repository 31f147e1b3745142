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
else the stable Kahn order closest to it) with constants lifted out and shape arithmetic
(``Shape`` of a tensor and what only shapes and constants feed) hoisted to where it can first
run: exporters read the input's shape at the very end (to resize an output back to it), which
would keep the raw input live across every boundary. The few int64 values shape arithmetic makes
are sent like any tensor but do not count against ``max_frontier``. For a model with long skips
(U-Net) every boundary between an encoder level and the decoder Concat that reads it carries that
skip: that is a property of the graph, not of the order, and such boundaries have frontier 2+
and are rejected by ``max_frontier=1`` or kept with their honest byte count. Other independent
side chains are not reordered; the minimum cuts below reach partitions no order-prefix does.

Partitions that are not prefixes. Beside the sweep, :func:`find_cuts` takes the minimum cut of
the DAG for each regime it is given (:mod:`tandem.compiler._mincut`, DADS): a down-set of the
DAG, often not a prefix of the order above. Such a cut is a candidate like any other
(:func:`cut_from_head` builds it from its head nodes). Its ``position`` is the number of compute
nodes in its head, and its ``id`` cannot be a boundary: it is ``N + 1 + h``, ``h`` a hash of its
frontier's tensor names below 1,000,000 (probed to the next free id on a clash), so it is the
same in every compile of the model. A min-cut partition that equals a prefix is that boundary's
cut, with both origins. ``Cut.origins`` records who found a cut (the sweep, a regime, or
``endpoint`` for cut 0 and all-local).

Pareto set. For an edge-cloud split, both axes are costs to minimize: head FLOPs are work on the
weak device and frontier bytes are uplink time. A cut is *dominated* when another has head FLOPs
<= and frontier bytes <= (one strictly less): it makes the edge do at least as much and send at
least as much. Sorted by head FLOPs ascending, the kept cuts therefore send strictly fewer bytes
the more the edge computes: "head cost up, frontier bytes down" as the design puts it. (Keeping
the opposite direction, "more local work is better", would let the all-local plan dominate every
split.) ``max_cuts`` caps the interior cuts (the split points); cut 0 and cut N are always
present on top of them. Min-cut partitions on the front are kept first (each is the optimum of
a regime); the remaining slots go to a spread over head-FLOPs share (targets at even fractions
of the total).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, replace

from tandem.compiler._errors import CompileError
from tandem.compiler._graph import GraphInfo, sendable
from tandem.compiler._mincut import Regime, min_cut

__all__ = ["Cut", "Origin", "boundary_frontiers", "cut_from_head", "find_cuts", "pareto"]


@dataclass(frozen=True)
class Origin:
    """Who found a cut: ``method`` is ``"endpoint"``, ``"sweep"`` or ``"mincut"`` (then
    ``regime`` is the regime it is optimal for)."""

    method: str
    regime: Regime | None = None


_SWEEP = Origin("sweep")
_ENDPOINT = Origin("endpoint")


@dataclass(frozen=True)
class Cut:
    """A split point. For a boundary of the compute-node order ``id == position`` (the number
    of compute nodes in the head); a min-cut partition that is no prefix has ``head`` (its
    nodes' positions) and an id above every boundary (see the module docstring).

    ``frontier`` lists the tensors that cross from head to tail in production order (graph
    inputs first); ``frontier_bytes`` is their size at ``GraphInfo``'s input shapes. For the
    all-local cut the frontier is empty (nothing is sent).
    """

    id: int
    position: int
    frontier: tuple[str, ...]
    frontier_bytes: int
    head_flops: int
    tail_flops: int
    origins: tuple[Origin, ...] = ()
    head: frozenset[int] | None = None  # None: the first ``position`` compute nodes

    @property
    def is_prefix(self) -> bool:
        return self.head is None

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
    """Every interior boundary (1..N-1) whose frontier has 1..``max_frontier`` tensors (not
    counting shape-arithmetic tensors, ``GraphInfo.shape_tensors``: a few int64 values).

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
    # cannot be declared as a part's input/output, and one whose dtype the wire cannot carry
    # (float64, int16, ...) could not be sent: boundaries where one is live are skipped.
    untyped = {name for name in position if not sendable(info, name)}
    live: dict[str, int] = {}
    live_bytes = 0
    live_untyped = 0
    live_shapes = 0  # shape-arithmetic tensors: sent, but not counted against max_frontier
    shapes = info.shape_tensors
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
                live_shapes += out in shapes
        for name in expire[b - 1]:
            if name in live:
                live_bytes -= live.pop(name)
                live_untyped -= name in untyped
                live_shapes -= name in shapes
        if 1 <= len(live) - live_shapes <= max_frontier and not live_untyped:
            yield Cut(
                id=b,
                position=b,
                frontier=tuple(live),
                frontier_bytes=live_bytes,
                head_flops=flops_before,
                tail_flops=total - flops_before,
                origins=(_SWEEP,),
            )


def cut_from_head(info: GraphInfo, head: Collection[int], *, cut_id: int | None = None,
                  origins: tuple[Origin, ...] = ()) -> Cut:
    """The cut whose head is the compute nodes at ``head`` (positions in
    ``info.compute_nodes``; must be a down-set). A prefix gets its boundary's id; anything else
    ``cut_id`` (required then)."""
    compute = info.compute_nodes
    n = len(compute)
    head = frozenset(head)
    constants = info.constants
    made = set(info.inputs)
    for pos in sorted(head):
        made.update(compute[pos].outputs)
    needed: dict[str, None] = {}
    for pos in range(n):
        if pos not in head:
            for name in compute[pos].inputs:
                if name in made and name not in constants:
                    needed.setdefault(name)
    for name in info.outputs:
        if name in made and name not in constants and (head or name in info.inputs):
            needed.setdefault(name)
    order = {name: -1 for name in info.inputs}
    for pos, node in enumerate(compute):
        for out in node.outputs:
            order[out] = pos
    frontier = tuple(sorted(needed, key=lambda t: (order.get(t, -1), t)))
    flops = sum(compute[p].flops for p in head)
    total = sum(node.flops for node in compute)
    prefix = head == frozenset(range(len(head)))
    if prefix:
        cut_id = len(head)
    elif cut_id is None:
        raise CompileError("a cut that is not a prefix of the order needs an id")
    if len(head) == n:
        frontier = ()
    return Cut(id=cut_id, position=len(head), frontier=frontier,
               frontier_bytes=sum(info.nbytes(t) for t in frontier), head_flops=flops,
               tail_flops=total - flops, origins=origins, head=None if prefix else head)


def _partition_id(info: GraphInfo, frontier: Iterable[str], taken: set[int]) -> int:
    n = len(info.compute_nodes)
    digest = hashlib.sha256("\n".join(sorted(frontier)).encode()).digest()
    cut_id = n + 1 + int.from_bytes(digest[:8], "big") % 1_000_000
    while cut_id in taken:
        cut_id += 1
    return cut_id


def mincut_cuts(info: GraphInfo, regimes: Iterable[Regime], *, solver: str = "scipy"
                ) -> list[Cut]:
    """One cut per distinct interior minimum cut over ``regimes`` (origins merged), in the
    order they were found. Partitions that would send a tensor :func:`sendable` refuses are
    left out."""
    n = len(info.compute_nodes)
    found: dict[frozenset[int], list[Origin]] = {}
    for regime in regimes:
        if regime.bytes_per_flop <= 0:
            continue
        head = min_cut(info, regime.bytes_per_flop, solver=solver)
        if 0 < len(head) < n:
            found.setdefault(head, []).append(Origin("mincut", regime))
    cuts, taken = [], set(range(n + 1))
    for head, origins in found.items():
        cut = cut_from_head(info, head, cut_id=-1, origins=tuple(origins))
        if not all(sendable(info, t) for t in cut.frontier):
            continue
        if not cut.is_prefix:
            cut = replace(cut, id=_partition_id(info, cut.frontier, taken))
            taken.add(cut.id)
        cuts.append(cut)
    return cuts


def pareto(cuts: list[Cut]) -> list[Cut]:
    """The cuts no other cut dominates on (head FLOPs, frontier bytes), both minimized.

    Returned sorted by head FLOPs ascending (so bytes strictly decrease). Ties on both axes keep
    the earliest boundary (a min-cut partition that ties a boundary merges its origins into it).
    """
    ordered = sorted(cuts, key=lambda c: (c.head_flops, c.frontier_bytes, not c.is_prefix,
                                          c.position))
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


def find_cuts(info: GraphInfo, max_frontier: int = 2, max_cuts: int = 8,
              regimes: Iterable[Regime] = (), *, solver: str = "scipy") -> list[Cut]:
    """Candidate cuts of ``info``: cut 0, a Pareto-optimal spread of splits (boundaries of the
    order, and the minimum cuts for ``regimes``), and all-local.

    ``max_cuts`` caps the interior cuts; cut 0 and all-local come on top (up to max_cuts + 2).
    A min-cut partition that sends more than ``max_frontier`` tensors is not a candidate.
    Returned in position order (min-cut partitions after the boundary of equal position).
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
        origins=(_ENDPOINT,),
    )
    if n == 0:
        return [first]
    local = Cut(id=n, position=n, frontier=(), frontier_bytes=0, head_flops=total, tail_flops=0,
                origins=(_ENDPOINT,))
    sweep = {c.position: c for c in boundary_frontiers(info, max_frontier)}
    partitions = []
    for cut in mincut_cuts(info, regimes, solver=solver):
        if cut.is_prefix:  # the same cut as a boundary: one cut, both origins
            known = sweep.get(cut.position)
            if known is not None:
                sweep[cut.position] = replace(known, origins=known.origins + cut.origins)
            continue
        if len([t for t in cut.frontier if t not in info.shape_tensors]) <= max_frontier:
            partitions.append(cut)
    # Interior cuts must beat cut 0 on bytes (cut 0 has the least head work possible).
    front = [c for c in pareto([first, *sweep.values(), *partitions]) if c.position]
    optimal = [c for c in front if any(o.method == "mincut" for o in c.origins)]
    if len(optimal) >= max_cuts:
        interior = _spread(optimal, max_cuts, total)
    else:
        rest = [c for c in front if c not in optimal]
        interior = optimal + _spread(rest, max_cuts - len(optimal), total)
    return [first, *sorted(interior, key=lambda c: (c.position, not c.is_prefix, c.id)), local]
