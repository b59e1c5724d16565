"""Drawing layout of a computation graph: layers by topological depth, folding of repeated blocks.

* :func:`layered_layout` places node ``v`` on row ``depth(v)`` (the longest chain of real edges from
  an input to ``v``) and orders each row with a few barycentre sweeps (a node moves towards the
  mean position of its neighbours in the rows above, then below), which removes most edge
  crossings of residual and multi-branch networks. Rows are centred on ``x = 0`` and ``y`` grows
  downwards as ``-depth``. Results are cached by graph signature.
* :func:`fold_graph` collapses nodes that share a module-path prefix of a given depth (``layer1.0``
  at depth 2 of a ResNet) into one node, so repeated blocks can be folded away; nodes without a
  module (sums, concatenations, pooling) join the module of their last predecessor that has one.
* :func:`edge_segments` turns edges into the ``None``-separated coordinate lists of a single
  plotly line trace; :func:`render_png` draws a layout to PNG bytes with Pillow.

Graphs after folding may contain cycles (a block feeding a node outside it that feeds the block
back); rows are then computed on the condensation, so every node of a cycle shares one row.
"""

from __future__ import annotations

import io
import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .core import ComputationGraph

log = logging.getLogger(__name__)

__all__ = [
    'BLOCK_OP',
    'Layout',
    'FoldedGraph',
    'layered_layout',
    'graph_layout',
    'fold_graph',
    'module_paths',
    'max_module_depth',
    'edge_segments',
    'line_segments',
    'render_png',
]

BLOCK_OP = 'block'  # op label of a folded group of several nodes
BLOCK_COLOR = '#9e9e9e'  # its fill colour
_SWEEPS = 3  # down+up barycentre passes; more rarely changes the picture
_CACHE_SIZE = 32  # layouts kept by signature
_MAX_ROUTED_SPAN = 12  # longer edges (DenseNet's concatenations) are arcs, not routed through rows
_MAX_DUMMIES = 4000  # routing points in all, to keep the layout fast on big graphs


@dataclass(frozen=True)
class Layout:
    """Positions of ``n`` nodes.

    Attributes:
        x: horizontal position, shape ``(n,)``; each row is centred on 0, unit spacing.
        y: vertical position ``-depth``, shape ``(n,)``.
        depth: row of each node, shape ``(n,)``.
        width: the widest row's count of nodes and routing points (spacing of a drawing).
        edges: ``(m, 2)`` the edges laid out.
        edge_points: polyline ``(k, 2)`` of each edge, from source to target.
    """

    x: np.ndarray
    y: np.ndarray
    depth: np.ndarray
    width: int
    edges: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    edge_points: list[np.ndarray] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        return int(self.depth.max()) + 1 if self.depth.size else 0


@dataclass
class FoldedGraph:
    """A graph whose nodes are groups of the original graph's nodes.

    Attributes:
        labels: one label per group: the module prefix, or the node name for a lone node.
        members: node indices (into the original graph) of each group.
        ops: the node's op for a lone node, :data:`BLOCK_OP` for a group of several.
        edges: ``(m, 2)`` real edges between distinct groups (deduplicated).
        node_group: group index of every original node, shape ``(n,)``.
        depth: the folding depth used (0 = nothing folded).
    """

    labels: list[str]
    members: list[list[int]]
    ops: list[str]
    edges: np.ndarray
    node_group: np.ndarray
    depth: int = 0
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


# ------------------------------------------------------------------------------------------ layering
def _layers(n: int, edges: np.ndarray) -> np.ndarray:
    """Longest-path row of each node; nodes of one strongly connected component share a row."""
    depth = np.zeros(n, dtype=np.int64)
    if n == 0 or len(edges) == 0:
        return depth
    src, dst = edges[:, 0], edges[:, 1]
    if (src < dst).all():  # already topologically ordered (the usual case): one sweep by target
        for u, v in edges[np.argsort(dst, kind='stable')]:
            if depth[u] + 1 > depth[v]:
                depth[v] = depth[u] + 1
        return depth
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    adj = csr_matrix((np.ones(len(edges)), (src, dst)), shape=(n, n))
    n_comp, comp = connected_components(adj, directed=True, connection='strong')
    cedges = {(int(a), int(b)) for a, b in zip(comp[src], comp[dst]) if a != b}
    indeg = np.zeros(n_comp, dtype=np.int64)
    succ: dict[int, list[int]] = {}
    for a, b in cedges:
        indeg[b] += 1
        succ.setdefault(a, []).append(b)
    cdepth = np.zeros(n_comp, dtype=np.int64)
    ready = [c for c in range(n_comp) if indeg[c] == 0]
    while ready:  # Kahn's order on the condensation (a DAG)
        a = ready.pop()
        for b in succ.get(a, ()):
            cdepth[b] = max(cdepth[b], cdepth[a] + 1)
            indeg[b] -= 1
            if indeg[b] == 0:
                ready.append(b)
    return cdepth[comp]


def _centred(rows: list[list[int]], n: int) -> np.ndarray:
    x = np.zeros(n, dtype=np.float64)
    for row in rows:
        k = len(row)
        x[row] = np.arange(k) - (k - 1) / 2.0
    return x


def _order_rows(
    rows: list[list[int]], preds: list[list[int]], succs: list[list[int]], sweeps: int
) -> np.ndarray:
    """Barycentre ordering of ``rows`` in place; returns the centred x of every node."""
    x = _centred(rows, len(preds))
    for _ in range(sweeps):
        for neighbours, order in ((preds, range(len(rows))), (succs, range(len(rows) - 1, -1, -1))):
            for r in order:
                row = rows[r]
                if len(row) < 2:
                    continue
                keys = [float(np.mean(x[neighbours[v]])) if neighbours[v] else x[v] for v in row]
                rows[r] = [v for _, v in sorted(zip(keys, row), key=lambda t: t[0])]
                k = len(row)
                x[rows[r]] = np.arange(k) - (k - 1) / 2.0
    return x


def layered_layout(
    n: int,
    edges: np.ndarray,
    sweeps: int = _SWEEPS,
    max_span: int = _MAX_ROUTED_SPAN,
    max_dummies: int = _MAX_DUMMIES,
) -> Layout:
    """Layered layout of a graph given as ``n`` nodes and ``(m, 2)`` directed edges.

    An edge that skips rows is routed through placeholder points in the rows it crosses (they take
    part in the ordering, so skip connections run beside the main chain instead of through its
    nodes), shortest edges first, up to ``max_span`` rows and ``max_dummies`` points in all; longer
    edges are drawn as an arc bulging to the right.

    Args:
        n: number of nodes.
        edges: rows ``(source, target)``; self-loops are ignored.
        sweeps: barycentre passes (each one down then up).
        max_span: longest edge (in rows) that gets routed points.
        max_dummies: routed points in all.

    Returns:
        A :class:`Layout`; ``edge_points[i]`` is the polyline of ``edges[i]`` (after dropping self-loops).
    """
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    edges = edges[edges[:, 0] != edges[:, 1]]
    depth = _layers(n, edges)
    span = depth[edges[:, 1]] - depth[edges[:, 0]] if len(edges) else np.zeros(0, dtype=np.int64)
    n_rows = int(depth.max()) + 1 if n else 0
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    for v in range(n):  # initial order: node order (the builder's topological order)
        rows[depth[v]].append(v)
    preds: list[list[int]] = [[] for _ in range(n)]
    succs: list[list[int]] = [[] for _ in range(n)]
    chains: dict[int, list[int]] = {}  # edge index -> its placeholder nodes, top to bottom
    budget = max_dummies
    for e in np.argsort(span, kind='stable').tolist():
        u, v = int(edges[e, 0]), int(edges[e, 1])
        s = int(span[e])
        if 1 < s <= max_span and s - 1 <= budget:
            budget -= s - 1
            chain = list(range(len(preds), len(preds) + s - 1))
            for k, d in enumerate(chain):
                preds.append([])
                succs.append([])
                rows[depth[u] + 1 + k].append(d)
            chains[e] = chain
            path = [u, *chain, v]
        else:
            path = [u, v]
        for a, b in zip(path[:-1], path[1:]):
            preds[b].append(a)
            succs[a].append(b)
    x_all = _order_rows(rows, preds, succs, sweeps)
    ys_all = np.zeros(len(preds), dtype=np.float64)
    for r, row in enumerate(rows):
        ys_all[row] = -r
    points = []
    for e in range(len(edges)):
        u, v = int(edges[e, 0]), int(edges[e, 1])
        if e in chains:
            path = [u, *chains[e], v]
            points.append(np.stack([x_all[path], ys_all[path]], axis=1))
        elif span[e] > 1:  # unrouted long edge: an arc through a point right of both ends
            bulge = max(x_all[u], x_all[v]) + 0.6 + 0.15 * float(np.log2(span[e]))
            mid = (ys_all[u] + ys_all[v]) / 2.0
            points.append(np.array([[x_all[u], ys_all[u]], [bulge, mid], [x_all[v], ys_all[v]]]))
        else:
            points.append(np.array([[x_all[u], ys_all[u]], [x_all[v], ys_all[v]]]))
    width = max((len(r) for r in rows), default=0)
    return Layout(
        x=x_all[:n].copy(),
        y=-depth.astype(np.float64),
        depth=depth,
        width=width,
        edges=edges,
        edge_points=points,
    )


_LAYOUTS: OrderedDict[tuple, Layout] = OrderedDict()


def graph_layout(graph: ComputationGraph, fold_depth: int = 0) -> tuple[Layout, FoldedGraph]:
    """Layout of ``graph`` (folded at ``fold_depth``; 0 = every node), cached.

    The cache key is the graph signature plus the module paths when folding (the signature ignores
    names, and folding depends on them).

    Returns:
        The layout of the folded graph and the folded graph itself (one group per node when
        ``fold_depth`` is 0).
    """
    key: tuple = (graph.signature(), int(fold_depth))
    if fold_depth > 0:
        key += (tuple(module_paths(graph)),)
    hit = _LAYOUTS.get(key)
    if hit is not None:
        _LAYOUTS.move_to_end(key)
        return hit
    folded = fold_graph(graph, fold_depth)
    out = (layered_layout(len(folded), folded.edges), folded)
    _LAYOUTS[key] = out
    while len(_LAYOUTS) > _CACHE_SIZE:
        _LAYOUTS.popitem(last=False)
    return out


# ------------------------------------------------------------------------------------------ folding
def module_paths(graph: ComputationGraph) -> list[str | None]:
    """Module path of every node; a node without one takes that of its last predecessor (in node
    order) that has one, so sums and pools fold into the block that produces their input. The
    input node keeps None."""
    direct = graph.direct_edges
    preds: dict[int, list[int]] = {}
    for u, v in direct.tolist():
        preds.setdefault(v, []).append(u)
    out: list[str | None] = []
    for i, node in enumerate(graph.nodes):
        mod = node.module
        if isinstance(mod, float):  # NaN from a DataFrame round trip
            mod = None
        if not mod and node.op != 'input':
            for u in sorted(preds.get(i, ()), reverse=True):
                if u < i and out[u]:
                    mod = out[u]
                    break
        out.append(mod or None)
    return out


def max_module_depth(graph: ComputationGraph) -> int:
    """The number of components of the longest module path (the deepest useful folding depth)."""
    return max((len(m.split('.')) for m in module_paths(graph) if m), default=0)


def fold_graph(graph: ComputationGraph, depth: int) -> FoldedGraph:
    """Collapse the nodes that share the first ``depth`` components of their module path.

    Args:
        graph: the graph.
        depth: module-path components that name a group; 0 keeps every node apart.

    Returns:
        A :class:`FoldedGraph`; groups are numbered in order of their first node.
    """
    n = len(graph.nodes)
    paths = module_paths(graph) if depth > 0 else [None] * n
    key_of: dict[str, int] = {}
    members: list[list[int]] = []
    node_group = np.zeros(n, dtype=np.int64)
    for i, path in enumerate(paths):
        if path is None:
            key = f'#node{i}'
        else:
            key = '.'.join(path.split('.')[:depth])
        g = key_of.get(key)
        if g is None:
            g = key_of[key] = len(members)
            members.append([])
        members[g].append(i)
        node_group[i] = g
    labels, ops = [], []
    for key, g in key_of.items():
        nodes = members[g]
        if len(nodes) == 1:
            labels.append(graph.nodes[nodes[0]].name)
            ops.append(graph.nodes[nodes[0]].op)
        else:
            labels.append(key)
            ops.append(BLOCK_OP)
    direct = graph.direct_edges
    if len(direct):
        ge = np.unique(node_group[direct], axis=0)
        ge = ge[ge[:, 0] != ge[:, 1]]
    else:
        ge = np.zeros((0, 2), dtype=np.int64)
    return FoldedGraph(labels=labels, members=members, ops=ops, edges=ge, node_group=node_group, depth=depth)


def group_ops(graph: ComputationGraph, folded: FoldedGraph) -> list[Counter]:
    """Op counts inside each group of ``folded``."""
    return [Counter(graph.nodes[i].op for i in m) for m in folded.members]


# ------------------------------------------------------------------------------------------ drawing
def edge_segments(layout: Layout) -> tuple[list, list]:
    """Coordinates of the laid-out edges for one line trace: polylines separated by ``None``."""
    xs: list = []
    ys: list = []
    for pts in layout.edge_points:
        xs += pts[:, 0].tolist() + [None]
        ys += pts[:, 1].tolist() + [None]
    return xs, ys


def line_segments(x: np.ndarray, y: np.ndarray, edges: np.ndarray) -> tuple[list, list]:
    """Straight lines ``x0, x1, None, ...`` for edges between positioned nodes (e.g. virtual edges)."""
    xs: list = []
    ys: list = []
    for u, v in np.asarray(edges, dtype=np.int64).reshape(-1, 2).tolist():
        xs += [float(x[u]), float(x[v]), None]
        ys += [float(y[u]), float(y[v]), None]
    return xs, ys


def _hex_rgb(color: str) -> tuple[int, int, int]:
    c = color.lstrip('#')
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def render_png(
    graph: ComputationGraph,
    fold_depth: int = 0,
    virtual: bool = False,
    max_side: int = 4000,
    title: str | None = None,
) -> bytes:
    """Draw the layered layout of ``graph`` as a PNG (Pillow; no browser needed).

    Args:
        graph: the graph.
        fold_depth: folding depth (see :func:`fold_graph`).
        virtual: also draw virtual edges (thin, light), only when nothing is folded.
        max_side: the longest image side in pixels; spacing shrinks to fit.
        title: text in the top-left corner.

    Returns:
        The PNG file's bytes.
    """
    from PIL import Image, ImageDraw, ImageFont

    from .export import OP_COLORS

    layout, folded = graph_layout(graph, fold_depth)
    n = len(folded)
    legend_ops = [op for op in dict.fromkeys(folded.ops)]
    margin, legend_h = 40, 22 * (len(legend_ops) + (2 if title else 1))
    xs_all = np.concatenate([p[:, 0] for p in layout.edge_points] + [layout.x, np.zeros(1)])
    x_lo, x_hi = float(xs_all.min()), float(xs_all.max())
    step = max(6.0, min(40.0, (max_side - 2 * margin) / max(x_hi - x_lo + 1, layout.n_rows, 1)))
    width = int(max(2 * margin + step * (x_hi - x_lo), 360))
    pad = (width - 2 * margin - step * (x_hi - x_lo)) / 2
    height = int(2 * margin + legend_h + step * max(layout.n_rows - 1, 1))
    img = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()

    def _pix(p: list[float]) -> tuple[float, float]:
        return margin + pad + (p[0] - x_lo) * step, margin + legend_h - p[1] * step

    def pos(i: int) -> tuple[float, float]:
        return _pix([layout.x[i], layout.y[i]])

    if virtual and fold_depth == 0:
        src, dst = np.nonzero(graph.adj > 1)
        for u, v in zip(src.tolist(), dst.tolist()):
            draw.line([pos(u), pos(v)], fill=(225, 225, 235), width=1)
    for pts in layout.edge_points:
        draw.line([_pix(p) for p in pts.tolist()], fill=(120, 120, 120), width=1)
    r = max(2.0, step * 0.3)
    for i in range(n):
        cx, cy = pos(i)
        fill = _hex_rgb(OP_COLORS.get(folded.ops[i], BLOCK_COLOR))
        rr = r * 1.4 if folded.ops[i] == BLOCK_OP else r
        draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=fill, outline=(60, 60, 60))
    y0 = 10
    if title:
        draw.text((10, y0), title, fill=(0, 0, 0), font=font)
        y0 += 22
    for op in legend_ops:
        fill = _hex_rgb(OP_COLORS.get(op, BLOCK_COLOR))
        draw.ellipse([10, y0 + 2, 22, y0 + 14], fill=fill, outline=(60, 60, 60))
        draw.text((28, y0 + 2), op, fill=(0, 0, 0), font=font)
        y0 += 22
    buf = io.BytesIO()
    img.save(buf, format='PNG')
    return buf.getvalue()
