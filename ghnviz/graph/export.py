"""Views of a :class:`~ghnviz.graph.core.ComputationGraph`: networkx, JSON, Graphviz DOT, summary, signature.

These are the implementations behind the ``ComputationGraph`` methods of the same names.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from .core import PRIMITIVES, Node

if TYPE_CHECKING:  # pragma: no cover
    import networkx as nx
    import pandas as pd

    from .core import ComputationGraph

__all__ = [
    'NODE_FIELDS',
    'OP_COLORS',
    'longest_path_depth',
    'signature',
    'summary',
    'to_dict',
    'from_dict',
    'to_json',
    'to_dot',
    'to_networkx',
    'to_frame',
]

# Node attributes exported, in this order.
NODE_FIELDS = ('name', 'op', 'param', 'shape', 'module', 'cell', 'lookup', 'is_cls_w', 'is_cls_b')

# One fill colour per primitive (Graphviz/plotly friendly hex), convolutions in warm colours.
OP_COLORS: dict[str, str] = {
    'max_pool': '#8dd3c7',
    'avg_pool': '#80b1d3',
    'sep_conv': '#fdb462',
    'dil_conv': '#fb8072',
    'conv': '#f4a582',
    'msa': '#404040',
    'cse': '#bc80bd',
    'sum': '#d9d9d9',
    'concat': '#b3de69',
    'input': '#ffffff',
    'bias': '#ff00ff',
    'bn': '#bebada',
    'ln': '#ffff33',
    'pos_enc': '#ccebc5',
    'glob_avg': '#ffed6f',
}


def _node_dict(node: Node) -> dict:
    d = {f: getattr(node, f) for f in NODE_FIELDS}
    if d['shape'] is not None:
        d['shape'] = list(d['shape'])
    return d


def signature(graph: ComputationGraph) -> str:
    """Hex digest of what a GHN sees of the architecture (op types, shapes, classifier flags,
    real edges, virtual-edge cutoff); parameter and module names are not part of it."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f'{len(graph.nodes)};{graph.ve_cutoff};'.encode())
    h.update(graph.op_indices.astype(np.int8).tobytes())
    h.update(
        repr(
            [(n.shape, n.is_cls_w, n.is_cls_b) for n in graph.nodes if n.shape is not None or n.is_cls_w]
        ).encode()
    )
    h.update(np.ascontiguousarray(graph.direct_edges, dtype=np.int32).tobytes())
    return h.hexdigest()


def longest_path_depth(graph: ComputationGraph) -> np.ndarray:
    """Length (in real edges) of the longest path from a source to each node, shape ``(n,)``.

    Nodes on a cycle (rare: tied weights, some Swin graphs) share the depth of their strongly
    connected component.
    """
    n = len(graph.nodes)
    depth = np.zeros(n, dtype=np.int64)
    edges = graph.direct_edges
    if len(edges) == 0:
        return depth
    if (edges[:, 0] < edges[:, 1]).all():  # nodes are topologically ordered: one sweep by target
        for u, v in edges[np.argsort(edges[:, 1], kind='stable')]:
            if depth[u] + 1 > depth[v]:
                depth[v] = depth[u] + 1
        return depth
    import networkx as nx

    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    g.add_edges_from(map(tuple, edges.tolist()))
    cond = nx.condensation(g)  # DAG of strongly connected components
    comp_depth = dict.fromkeys(cond.nodes, 0)
    for c in nx.topological_sort(cond):
        for p in cond.predecessors(c):
            comp_depth[c] = max(comp_depth[c], comp_depth[p] + 1)
    for v, c in cond.graph['mapping'].items():
        depth[v] = comp_depth[c]
    return depth


def summary(graph: ComputationGraph) -> dict:
    """Counts and sizes: nodes per op type, edges, parameters covered, depth."""
    ops = Counter(n.op for n in graph.nodes)
    adj = graph.adj
    n_direct = int((adj == 1).sum())
    param_nodes = [n for n in graph.nodes if n.param is not None]
    covered = {n.param: int(np.prod(n.shape)) if n.shape else 0 for n in param_nodes}
    # tensors without a node and not predicted with another node (norm biases are)
    missing = set(graph.meta.get('params_without_node', [])) - set(graph.meta.get('norm_biases', []))
    return {
        'n_nodes': len(graph.nodes),
        'n_edges': n_direct,
        'n_virtual_edges': int((adj > 1).sum()),
        'max_edge_weight': int(adj.max()) if adj.size else 0,
        'ops': {op: ops[op] for op in PRIMITIVES if ops[op]},
        'n_param_nodes': len(param_nodes),
        'n_params_covered': sum(covered.values()),
        'n_tensors_without_node': len(missing),
        'depth': int(longest_path_depth(graph).max()) if len(graph.nodes) else 0,
        'n_cells': int(graph.meta.get('n_cells', 1)),
        'signature': signature(graph),
    }


def to_frame(graph: ComputationGraph) -> pd.DataFrame:
    """One row per node (fields of :class:`Node`, plus in/out degree and depth)."""
    import pandas as pd

    real = graph.adj == 1
    df = pd.DataFrame([_node_dict(n) for n in graph.nodes], columns=list(NODE_FIELDS))
    df['in_degree'] = real.sum(axis=0)
    df['out_degree'] = real.sum(axis=1)
    df['depth'] = longest_path_depth(graph)
    df.index.name = 'node'
    return df


def to_dict(graph: ComputationGraph, virtual: bool = True) -> dict:
    """Plain-data form: nodes, edges ``[source, target, length]`` (length 1 = real edge), meta."""
    adj = graph.adj if virtual else np.where(graph.adj == 1, 1, 0)
    src, dst = np.nonzero(adj)
    meta = json.loads(json.dumps(graph.meta, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))
    return {
        'nodes': [_node_dict(n) for n in graph.nodes],
        'edges': np.stack([src, dst, adj[src, dst]], axis=1).astype(int).tolist(),
        've_cutoff': graph.ve_cutoff,
        'meta': meta,
        'signature': signature(graph),
    }


def from_dict(data: dict) -> ComputationGraph:
    """Inverse of :func:`to_dict` (a dict without virtual edges gives a graph without them)."""
    from .core import ComputationGraph

    nodes = []
    for d in data['nodes']:
        d = dict(d)
        if d.get('shape') is not None:
            d['shape'] = tuple(d['shape'])
        nodes.append(Node(**d))
    n = len(nodes)
    adj = np.zeros((n, n), dtype=np.int64)
    for s, t, w in data['edges']:
        adj[s, t] = w
    return ComputationGraph(
        nodes=nodes, adj=adj, ve_cutoff=data.get('ve_cutoff', 50), meta=data.get('meta', {})
    )


def to_json(graph: ComputationGraph, virtual: bool = False, indent: int | None = None) -> str:
    """JSON text of :func:`to_dict` (real edges only unless ``virtual``)."""
    return json.dumps(to_dict(graph, virtual=virtual), indent=indent)


def _dot_escape(s: str) -> str:
    return s.replace('\\', '\\\\').replace('"', '\\"')


def _dot_quote(s: str) -> str:
    return '"' + _dot_escape(s) + '"'


def to_dot(graph: ComputationGraph, virtual: bool = False, name: str = 'G') -> str:
    """Graphviz DOT text: one box per node (op type, node name, shape), real edges solid,
    virtual edges (if asked) dashed with their length."""
    lines = [f'digraph {_dot_quote(name)} {{', '  rankdir=TB;', '  node [shape=box, style="rounded,filled"];']
    for i, n in enumerate(graph.nodes):
        parts = [n.op] if n.op == n.name or n.op == 'input' else [n.op, n.name]
        if n.shape is not None:
            parts.append('x'.join(str(s) for s in n.shape))
        label = '\\n'.join(_dot_escape(p) for p in parts)  # \n: DOT line break
        color = OP_COLORS.get(n.op, '#ffffff')
        font = ', fontcolor="white"' if n.op == 'msa' else ''
        lines.append(f'  {i} [label="{label}", fillcolor="{color}"{font}];')
    src, dst = np.nonzero(graph.adj == 1)
    lines += [f'  {s} -> {t};' for s, t in zip(src.tolist(), dst.tolist())]
    if virtual:
        src, dst = np.nonzero(graph.adj > 1)
        for s, t in zip(src.tolist(), dst.tolist()):
            lines.append(
                f'  {s} -> {t} [style=dashed, color=gray, constraint=false, label="{graph.adj[s, t]}"];'
            )
    lines.append('}')
    return '\n'.join(lines) + '\n'


def to_networkx(graph: ComputationGraph, virtual: bool = False) -> nx.DiGraph:
    """``networkx.DiGraph`` with node attributes (:data:`NODE_FIELDS`) and edge attributes
    ``length`` (1 for real edges, the shortest-path length for virtual ones) and ``virtual``."""
    import networkx as nx

    g = nx.DiGraph()
    g.graph.update(ve_cutoff=graph.ve_cutoff, **graph.meta)
    g.add_nodes_from((i, {f: getattr(n, f) for f in NODE_FIELDS}) for i, n in enumerate(graph.nodes))
    src, dst = np.nonzero(graph.adj == 1 if not virtual else graph.adj)
    w = graph.adj[src, dst]
    g.add_edges_from(
        (s, t, {'length': int(d), 'virtual': bool(d > 1)})
        for s, t, d in zip(src.tolist(), dst.tolist(), w.tolist())
    )
    return g
