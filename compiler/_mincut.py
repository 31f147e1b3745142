"""Optimal DAG partitions: the DADS construction (Hu et al., INFOCOM'19) as an s-t minimum cut.

The boundary sweep (:mod:`tandem.compiler._cuts`) only sees prefixes of one topological order.
On graphs with parallel branches (U-Net and FPN skips, residual streams, multi-input models) the
best split is often a *down-set* of the DAG that no prefix of that order equals. For a regime
(uplink bandwidth, edge and cloud speed) the partition that minimises

    edge compute + transfer + cloud compute
      = F_head / edge_speed + frontier_bytes / uplink + (F_total - F_head) / cloud_speed

is an s-t minimum cut. Since F_total is fixed, only one number matters, the price of a FLOP on
the edge in bytes of uplink, ``lambda = uplink * (1/edge_speed - 1/cloud_speed)``: minimise
``lambda * F_head + frontier_bytes`` over down-sets. The flow network (all capacities in bytes):

- the source ``s`` is the device holding the raw inputs; the sink ``t`` is the cloud;
- one vertex per compute node ``v`` with an edge ``v -> t`` of ``lambda * flops(v)`` (paid when
  ``v`` runs on the edge);
- one vertex per non-constant tensor ``x`` (the DADS trick, so a tensor read by several nodes is
  sent once): ``producer(x) -> x`` of ``bytes(x)`` (the producer of a graph input is ``s``),
  ``x -> w`` of infinity for each consumer ``w``, and ``x -> t`` of infinity for a graph output
  (the tail returns every output, so one made on the edge is carried);
- for each consumer ``w`` of a node ``u``'s output, ``w -> u`` of infinity: the edge side is
  closed under predecessors, a down-set, and no data flows back from the cloud.

Constants (initializers, Constant nodes and what only they feed) are not vertices: they are
copied to whichever side reads them. A tensor of unknown size gets an infinite capacity (never
cut there), and so does one whose dtype the wire cannot carry (float64, int16, ...), as the
sweep skips such boundaries. The source side of the minimum cut (the vertices
reachable from ``s`` in the residual network: the smallest optimal set) is the head.

Max-flow runs in ``scipy.sparse.csgraph.maximum_flow`` (Dinic) on an int64 CSR matrix: byte
capacities are integers already and FLOP prices are rounded to whole bytes (a partition is
optimal to within one byte per node). ``networkx`` (preflow-push) gives the same partitions and
is kept as the measured alternative (``benchmarks/zoo.py`` times both: scipy is 5-80x faster).
Among partitions of equal cost both return the smallest head.

Regimes (:func:`regimes`): uplinks of 1, 6, 20 and 100 Mbit/s times the edge/cloud speeds of the
compile's targets: a Jetson or CPU profile is an edge, a GPU profile a cloud; a device's
sustained speed is :data:`SUSTAINED` of its peak (FP16 TFLOPS, else INT8 TOPS / 2; sparse
figures halved). Without an edge profile the edge is :data:`DEFAULT_EDGE_GFLOPS`; without a
cloud profile the cloud is :data:`DEFAULT_SPEED_RATIOS` times the edge.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tandem.compiler._graph import GraphInfo, sendable
from tandem.protocol.lazy import require

if TYPE_CHECKING:  # pragma: no cover
    from tandem.devices.profiles import Profile

__all__ = [
    "DEFAULT_EDGE_GFLOPS",
    "DEFAULT_SPEED_RATIOS",
    "SUSTAINED",
    "UPLINKS_MBPS",
    "Regime",
    "min_cut",
    "regimes",
]

UPLINKS_MBPS = (1.0, 6.0, 20.0, 100.0)
#: sustained edge speed when no edge profile is among the targets: a few CPU cores running
#: ONNX Runtime (GFLOP/s)
DEFAULT_EDGE_GFLOPS = 50.0
#: cloud speed / edge speed when no cloud (GPU) profile is among the targets
DEFAULT_SPEED_RATIOS = (10.0, 100.0)
#: share of a device's peak a real network sustains (a rule of thumb, the same on both sides)
SUSTAINED = 0.3


@dataclass(frozen=True)
class Regime:
    """Uplink bandwidth and sustained edge / cloud speeds (GFLOP/s) a partition is optimal for."""

    uplink_mbps: float
    edge_gflops: float
    cloud_gflops: float

    @property
    def bytes_per_flop(self) -> float:
        """``lambda``: uplink bytes that take as long as one FLOP more on the edge saves."""
        uplink_bytes_s = self.uplink_mbps * 1e6 / 8
        return uplink_bytes_s * (1 / (self.edge_gflops * 1e9) - 1 / (self.cloud_gflops * 1e9))

    def describe(self) -> str:
        return (f"{self.uplink_mbps:g} Mbit/s, edge {self.edge_gflops:g} GFLOP/s, "
                f"cloud {self.cloud_gflops:g} GFLOP/s")


def _sustained_gflops(profile: Profile) -> float | None:
    if profile.fp16_tflops:
        peak = profile.fp16_tflops / (2 if profile.fp16_sparse else 1)
    elif profile.int8_tops:
        peak = profile.int8_tops / (2 if profile.int8_sparse else 1) / 2
    else:
        return None
    return peak * 1000 * SUSTAINED


def regimes(profiles: Iterable[Profile] = (),
            uplinks_mbps: Sequence[float] = UPLINKS_MBPS) -> list[Regime]:
    """The regimes to find minimum cuts for, from the compile's target profiles (see the module
    docstring); regimes where the edge is not slower than the cloud are left out."""
    edges, clouds = [], []
    for p in profiles:
        speed = _sustained_gflops(p)
        if p.kind == "gpu":
            if speed:
                clouds.append(speed)
        elif p.kind in ("jetson", "cpu"):
            edges.append(speed or DEFAULT_EDGE_GFLOPS)
    edges = sorted(set(edges)) or [DEFAULT_EDGE_GFLOPS]
    pairs = [(e, c) for e in edges for c in sorted(set(clouds))] if clouds else \
        [(e, e * r) for e in edges for r in DEFAULT_SPEED_RATIOS]
    return [Regime(float(u), float(e), float(c)) for u in uplinks_mbps for e, c in pairs
            if c > e]


def min_cut(info: GraphInfo, bytes_per_flop: float, *, solver: str = "scipy") -> frozenset[int]:
    """Positions (in ``info.compute_nodes``) of the head that minimises
    ``bytes_per_flop * head FLOPs + frontier bytes`` over the down-sets of the DAG (see the
    module docstring). ``solver``: ``"scipy"`` or ``"networkx"``."""
    network = _Network(info, bytes_per_flop)
    if solver == "scipy":
        source_side = network.solve_scipy()
    elif solver == "networkx":
        source_side = network.solve_networkx()
    else:
        raise ValueError(f"unknown max-flow solver {solver!r}")
    n = len(info.compute_nodes)
    return frozenset(v - 2 for v in source_side if 2 <= v < n + 2)


class _Network:
    """The DADS flow network of ``info`` at one price; vertex 0 is s, 1 is t, 2.. the compute
    nodes in order, then the tensors."""

    def __init__(self, info: GraphInfo, price: float) -> None:
        compute = info.compute_nodes
        n = len(compute)
        constants = info.constants
        producer: dict[str, int] = {name: 0 for name in info.inputs}  # 0 = s
        for pos, node in enumerate(compute):
            for out in node.outputs:
                producer[out] = pos + 2
        consumers: dict[str, list[int]] = {}
        for pos, node in enumerate(compute):
            for name in dict.fromkeys(node.inputs):
                if name in producer and name not in constants:
                    consumers.setdefault(name, []).append(pos + 2)
        outputs = [o for o in info.outputs if o in producer]
        edges: list[tuple[int, int, int | None]] = []  # (u, v, capacity or None = infinite)
        for pos, node in enumerate(compute):
            cost = round(price * node.flops)
            if cost > 0:
                edges.append((pos + 2, 1, cost))
        tensors = [t for t in producer if t in consumers or t in outputs]
        for i, name in enumerate(tensors):
            x = n + 2 + i
            size = info.nbytes(name) if sendable(info, name) else None
            edges.append((producer[name], x, size))
            for w in consumers.get(name, ()):
                edges.append((x, w, None))
                if producer[name] != 0:
                    edges.append((w, producer[name], None))
            if name in outputs:
                edges.append((x, 1, None))
        self.n_vertices = n + 2 + len(tensors)
        finite = sum(c for _, _, c in edges if c is not None)
        self.infinite = finite + 1
        self.edges = edges

    def solve_scipy(self) -> set[int]:
        import numpy as np

        require("scipy", "cpu")
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import breadth_first_order, maximum_flow

        rows = np.fromiter((u for u, _, _ in self.edges), np.int64, len(self.edges))
        cols = np.fromiter((v for _, v, _ in self.edges), np.int64, len(self.edges))
        caps = np.fromiter((self.infinite if c is None else c for _, _, c in self.edges),
                           np.int64, len(self.edges))
        shape = (self.n_vertices, self.n_vertices)
        capacity = csr_matrix((caps, (rows, cols)), shape=shape)  # duplicates add up
        capacity.sum_duplicates()
        flow = maximum_flow(capacity, 0, 1, method="dinic").flow
        residual = (capacity - flow).tocsr()
        residual.data[residual.data < 0] = 0
        residual.eliminate_zeros()
        reached = breadth_first_order(residual, 0, directed=True, return_predecessors=False)
        return {int(v) for v in reached}

    def solve_networkx(self) -> set[int]:
        nx = require("networkx", "dev")
        graph = nx.DiGraph()
        graph.add_nodes_from(range(self.n_vertices))
        for u, v, c in self.edges:
            if u == v:
                continue
            data = graph.get_edge_data(u, v)
            if data is None:
                graph.add_edge(u, v, capacity=self.infinite if c is None else c)
            else:
                data["capacity"] += self.infinite if c is None else c
        # the smallest source side, as for scipy: what s reaches in the residual network
        residual = nx.algorithms.flow.preflow_push(graph, 0, 1)
        reached, stack = {0}, [0]
        while stack:
            u = stack.pop()
            for v, data in residual[u].items():
                if v not in reached and data["capacity"] - data["flow"] > 0:
                    reached.add(v)
                    stack.append(v)
        return reached
