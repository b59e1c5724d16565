"""Graph rewriting passes that turn the raw autograd graph into a DeepNets-1M style graph.

Nodes are referred to by their index in a :class:`~ghnviz.graph.trace.RawGraph`; a pass works on
an ordered list of such indices (the current node order) and either adjacency sets (on the large
raw graph) or a dense boolean matrix whose rows/columns follow the current order.

The passes reproduce the published GHN graph builder's behaviour, quirks included (substring
matching of names, neighbour-position heuristics), because a GHN embeds exactly those graphs.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

import numpy as np

from .ops_table import OP_TABLE, is_supported_param, op_name
from .trace import RawGraph

# name prefixes of the nodes around a squeeze-and-excitation product or a classifier head
_HEAD_PREFIXES = ('classifier', 'fc', 'head')
_GATE_BEFORE = ('hard', 'sigmoid')
_SQUEEZE_BEFORE = ('relu', 'mean')
_GATE_AFTER = ('hard', 'sigmoid', 'relu')


def has_gating(names: Sequence[str]) -> bool:
    """Whether the network has a sigmoid/swish op: then ``Mul`` nodes may be SE gates (``cse``)."""
    return any('sigmoid' in n.lower() or 'swish' in n.lower() for n in names)


def unsupported_names(g: RawGraph) -> list[str]:
    """Names of raw nodes that have no primitive type (each distinct name once, first-seen order)."""
    out = {}
    for name, mod in zip(g.names, g.modules):
        if mod is not None:
            ok = is_supported_param(mod, name)
        else:
            ok = False
        if not ok and op_name(name) not in OP_TABLE:
            out[name] = None
    return list(out)


def _keep(name: str, near: dict[int, str] | None, n_in: int, gating: bool) -> bool:
    """Decide whether a node matched by a filtering pass stays.

    Args:
        name: the node's name.
        near: lower-cased names of the nodes at relative positions -1, -2, -3 and +1 in the
            current order, or None when there is no next node (the node is then treated as part
            of the classifier head).
        n_in: the node's in-degree when filtering started.
        gating: the network has sigmoid/swish ops (see :func:`has_gating`).
    """
    head = near is None or near[-1].startswith(_HEAD_PREFIXES) or near[-2].startswith(_HEAD_PREFIXES)
    if name.startswith('Mean'):
        # inside SE blocks a mean is the squeeze; only the final global pooling stays
        return head if gating else True
    if name.startswith('Mul'):
        return (
            gating
            and not head
            and (
                near[-2].startswith(_GATE_BEFORE)
                or near[-3].startswith(_SQUEEZE_BEFORE)
                or near[1].startswith(_GATE_AFTER)
            )
        )
    if name.startswith(('Cat', 'Add')):
        return n_in > 1  # a sum/concat of a single input is a no-op
    return False


_SPECIAL = ('Mean', 'Mul', 'Cat', 'Add')  # names whose fate depends on _keep's rules


def _neighbours(pos: int, alive: np.ndarray, order: list[int], names: list[str]) -> dict[int, str] | None:
    """Names at relative positions -3..-1 and +1 among the alive entries of ``order``.

    Negative positions before the first alive entry wrap around to the end (list indexing).
    """
    n_alive = int(alive.sum())
    rank = int(alive[:pos].sum())  # position of ``pos`` among alive entries
    if rank + 1 >= n_alive:
        return None
    alive_pos = np.flatnonzero(alive)
    near = {}
    for j in (-1, -2, -3, 1):
        r = rank + j
        if r < -n_alive:
            return None
        near[j] = names[order[alive_pos[r]]].lower()
    return near


def _matching(patterns_blob: str, offsets: list[int], pattern: str) -> set[int]:
    """Indices of the names (joined by newlines in ``patterns_blob``) that contain ``pattern``."""
    out = set()
    k = patterns_blob.find(pattern)
    while k >= 0:
        out.add(bisect.bisect_right(offsets, k) - 1)
        k = patterns_blob.find(pattern, k + 1)
    return out


def filter_nodes(
    order: list[int],
    succ: dict[int, set[int]],
    pred: dict[int, set[int]],
    names: list[str],
    patterns: Sequence[str],
) -> list[int]:
    """Remove nodes pass by pass; edges through a removed node are rewired around it.

    For each pattern in turn, every node whose name contains it is tested with :func:`_keep`
    (positions refer to the order at the start of that pass; in-degrees to the start of the
    call) and removed if it fails. ``succ``/``pred`` are updated in place.

    Returns:
        The new order (kept nodes, relative order unchanged).
    """
    n = len(order)
    alive = np.ones(n, dtype=bool)
    n_in = [len(pred[v]) for v in order]
    gating = has_gating([names[v] for v in order])
    # distinct names, each with the positions holding it; substring search on one joined string
    by_name: dict[str, list[int]] = {}
    for pos, v in enumerate(order):
        by_name.setdefault(names[v], []).append(pos)
    distinct = list(by_name)
    blob = '\n'.join(distinct)
    offsets = list(itertools.accumulate((len(d) + 1 for d in distinct[:-1]), initial=0))

    for pat in patterns:
        candidates = sorted(
            pos for k in _matching(blob, offsets, pat) for pos in by_name[distinct[k]] if alive[pos]
        )
        removed = []
        for pos in candidates:
            name = names[order[pos]]
            near = _neighbours(pos, alive, order, names) if name.startswith(_SPECIAL) else None
            if not _keep(name, near, n_in[pos], gating):
                removed.append(order[pos])
        if not removed:
            continue
        # rewire: predecessors of a removed node feed its successors (the removed nodes stay
        # in place until the end of the pass, like the elimination of a vertex)
        for v in removed:
            outs, ins = list(succ[v]), list(pred[v])
            for a in ins:
                for b in outs:
                    if a != b and b not in succ[a]:
                        succ[a].add(b)
                        pred[b].add(a)
        gone = set(removed)
        for v in removed:
            for b in succ.pop(v):
                if b not in gone:
                    pred[b].discard(v)
            for a in pred.pop(v):
                if a not in gone:
                    succ[a].discard(v)
        alive[[pos for pos in candidates if order[pos] in gone]] = False
    return [v for pos, v in enumerate(order) if alive[pos]]


def to_dense(order: list[int], succ: dict[int, set[int]]) -> np.ndarray:
    """Boolean adjacency matrix of ``order`` (rows/columns follow the order)."""
    pos = {v: i for i, v in enumerate(order)}
    A = np.zeros((len(order), len(order)), dtype=bool)
    for v in order:
        cols = [pos[b] for b in succ[v]]
        A[pos[v], cols] = True
    return A


def to_sets(order: list[int], A: np.ndarray) -> tuple[dict[int, set[int]], dict[int, set[int]]]:
    """Adjacency sets keyed by raw node index from a dense matrix over ``order``."""
    succ = {v: set() for v in order}
    pred = {v: set() for v in order}
    for i, j in zip(*np.nonzero(A)):
        a, b = order[i], order[j]
        succ[a].add(b)
        pred[b].add(a)
    return succ, pred


def fix_weight_edges(order: list[int], A: np.ndarray, names: list[str], modules: list) -> None:
    """Put weights before their biases where the trace left a weight as a source (in place).

    A linear layer's trace makes the bias the op node, fed by the previous layer and by its
    weight, which then has no input. Such a weight swaps places with the bias (or with a softmax
    it feeds, for attention projections), and the bias takes over the weight's other outputs when
    the weight had just one.
    """
    n = len(order)
    for i in range(n):
        node = order[i]
        if A[:, i].any() or 'weight' not in names[node]:
            continue
        for out in np.flatnonzero(A[i]):
            same_layer = modules[node] is modules[order[out]]
            qkv = not A[:, i].any() and 'softmax' in names[order[out]].lower()
            if not (same_layer or qkv):
                continue
            n_out = int(A[i].sum())
            others_in = np.flatnonzero(A[:, out])
            if not (others_in != i).any():
                continue  # the weight is the only input: already right
            order[i], order[out] = order[out], order[i]
            A[i, out], A[out, i] = False, True
            if n_out == 1:
                moved = np.flatnonzero(A[out])
                moved = moved[moved != i]
                if len(moved):
                    A[out, moved] = False
                    A[i, moved] = True


def _reaching(A: np.ndarray, dst: int, allowed: np.ndarray) -> np.ndarray:
    """Mask of the ``allowed`` nodes that reach ``dst`` through ``allowed`` nodes (``dst`` included)."""
    reach = np.zeros(len(A), dtype=bool)
    reach[dst] = True
    frontier = [dst]
    while frontier:
        prev = np.flatnonzero(A[:, frontier].any(axis=1) & allowed & ~reach)
        reach[prev] = True
        frontier = list(prev)
    return reach


def _has_cycle(A: np.ndarray, nodes: np.ndarray) -> bool:
    """Whether the subgraph of ``A`` induced by the index array ``nodes`` has a directed cycle (Kahn)."""
    sub = A[np.ix_(nodes, nodes)]
    indeg = sub.sum(axis=0).astype(np.int64)
    ready = list(np.flatnonzero(indeg == 0))
    seen = 0
    while ready:
        v = ready.pop()
        seen += 1
        succ = np.flatnonzero(sub[v])
        indeg[succ] -= 1
        ready.extend(succ[indeg[succ] == 0])
    return seen < len(nodes)


def _count_paths(A: np.ndarray, src: int, dst: int, limit: int = 2) -> int:
    """Number of simple directed paths from ``src`` to ``dst`` in ``A``, counted up to ``limit``.

    Depth-first search over the nodes that reach ``dst``. In an acyclic graph every such branch ends at
    ``dst``, so at most ``limit`` paths are walked. Graphs with cycles (modules shared between parallel
    branches, as in CoaT) can send a search down exponentially many dead ends; there a branch is taken
    only if it still reaches ``dst`` without the nodes already on the path, which keeps the search
    polynomial and the count exact.
    """
    can_reach = _reaching(A, dst, np.ones(len(A), dtype=bool))
    if not can_reach[src]:
        return 0
    guarded = _has_cycle(A, np.flatnonzero(can_reach))
    count = 0
    on_path = np.zeros(len(A), dtype=bool)
    on_path[src] = True
    stack = [(src, iter(np.flatnonzero(A[src] & can_reach)))]
    while stack:
        v, it = stack[-1]
        w = next(it, None)
        if w is None:
            stack.pop()
            on_path[v] = False
            continue
        if w == dst:
            count += 1
            if count >= limit:
                return count
        elif not on_path[w]:
            if guarded and not _reaching(A, dst, ~on_path)[w]:
                continue
            on_path[w] = True
            stack.append((w, iter(np.flatnonzero(A[w] & can_reach))))
    return count


def fix_softmax_edges(order: list[int], A: np.ndarray, names: list[str]) -> None:
    """Route attention through its softmax node, as in DeepNets-1M graphs (in place).

    For the node after a softmax, each other input that also reaches it through the softmax loses
    its direct edge; an input that reaches it only directly is redirected into the softmax.
    Path counts use the graph as it was before this pass.
    """
    before = A.copy()
    for i in range(len(order)):
        if 'softmax' not in names[order[i]].lower():
            continue
        for out in np.flatnonzero(A[i]):
            for j in np.flatnonzero(A[:, out]):
                if j == i:
                    continue
                n_paths = _count_paths(before, j, out)
                if n_paths > 1 or not A[i, j]:
                    A[j, out] = False
                if n_paths == 1 and not A[i, j]:
                    A[j, i] = True


def fix_swin_edges(order: list[int], A: np.ndarray, names: list[str]) -> None:
    """Patch-merging edges of torchvision Swin transformers (in place).

    The norm before a patch-merging reduction is wired to that reduction instead of the next
    block, and the attention projection bias feeding the reduction feeds the residual sum instead.
    """
    n = len(order)
    for i in range(n):
        name = names[order[i]]
        low = name.lower()
        if low.endswith('norm.weight'):
            for out in np.flatnonzero(A[i]):
                out_name = names[order[out]]
                if out_name.endswith('norm1.weight') or 'Add' in out_name:
                    A[i, out] = False
                    target = name.replace('norm', 'reduction')
                    for j in range(n):
                        if target in names[order[j]]:
                            A[i, j] = True
                            break
        elif low.endswith('attn.proj.bias'):
            for out in np.flatnonzero(A[i]):
                if names[order[out]].endswith('reduction.weight'):
                    A[i, out] = False
                    for out2 in np.flatnonzero(A[out]):
                        if names[order[out2]].startswith('AddBackward'):
                            A[i, out2] = True


def topological_order(A: np.ndarray) -> np.ndarray | None:
    """Kahn's algorithm by generations, children in index order; None if ``A`` has a cycle.

    Sources are taken in index order and each generation is expanded before the next, which
    fixes the node order among equally valid topological orders.
    """
    n = len(A)
    indeg = A.sum(axis=0).astype(np.int64)
    succ = [np.flatnonzero(row) for row in A]
    current = list(np.flatnonzero(indeg == 0))
    out = []
    while current:
        nxt = []
        for u in current:
            out.append(u)
            for c in succ[u]:
                indeg[c] -= 1
                if indeg[c] == 0:
                    nxt.append(c)
        current = nxt
    if len(out) < n:
        return None
    return np.asarray(out, dtype=np.int64)
