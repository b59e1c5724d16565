"""The computation graph container shared by every part of ghnviz.

A :class:`ComputationGraph` is what a GHN consumes: an ordered list of nodes (each an operation
of one of the 15 DeepNets-1M primitive types, optionally standing for one parameter tensor of
the model) and a dense matrix of edge values. ``adj[u, v] == 1`` is a real edge of the forward
computation (u feeds v); ``adj[u, v] == d > 1`` is a virtual edge: the shortest directed path
from u to v has length d (kept up to ``ve_cutoff``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# The DeepNets-1M primitive types, in the order the published GHNs index their embedding table.
PRIMITIVES: tuple[str, ...] = (
    'max_pool',
    'avg_pool',
    'sep_conv',
    'dil_conv',
    'conv',
    'msa',
    'cse',
    'sum',
    'concat',
    'input',
    'bias',
    'bn',
    'ln',
    'pos_enc',
    'glob_avg',
)
PRIMITIVE_INDEX: dict[str, int] = {p: i for i, p in enumerate(PRIMITIVES)}


@dataclass
class Node:
    """One node of a computation graph.

    Attributes:
        name: the node's name as the reference builder gives it: the full parameter name for a
            parameter node (``'layer1.0.conv1.weight'``), the autograd op name otherwise
            (``'AddBackward0'``), ``'input'`` for the input node.
        op: primitive type, one of :data:`PRIMITIVES`.
        param: full name (as in ``model.named_parameters()``) of the tensor this node stands for,
            or ``None`` for parameter-free nodes (sum, concat, pooling, input, ...).
        shape: the shape the GHN's shape encoder sees for this node: the parameter's shape for a
            parameter node, the pooling kernel as ``(1, 1, k, k)`` for pooling nodes, else ``None``.
        module: dotted path of the module owning the parameter (or producing the op), if known.
        is_cls_w: this is the classifier's weight (the reference's "second last" flag).
        is_cls_b: this is the classifier's bias (the reference's "last" flag).
        cell: cell index (DeepNets-1M networks have several; 0 for other models). A GHN looks
            parameters up per cell.
        lookup: the name under which a GHN looks this node's parameter up among the model's
            modules (the node name with DeepNets-1M normalisations: prefix before ``stem`` /
            ``pos_enc`` dropped, ``_ops.<i>.<j>`` -> ``_ops.<i>.op.<j>``); for pooling nodes the
            primitive name; None for nodes a GHN does not map to parameters or shapes (input,
            sum, concat, glob_avg, msa, cse).
    """

    name: str
    op: str
    param: str | None = None
    shape: tuple[int, ...] | None = None
    module: str | None = None
    is_cls_w: bool = False
    is_cls_b: bool = False
    cell: int = 0
    lookup: str | None = None

    @property
    def op_index(self) -> int:
        return PRIMITIVE_INDEX[self.op]


@dataclass
class ComputationGraph:
    """Nodes in topological order and their edge matrix.

    Attributes:
        nodes: nodes in the reference builder's order (node 0 is the input).
        adj: ``(n, n)`` integer matrix; 1 = real edge, d > 1 = virtual edge of shortest-path length d.
        ve_cutoff: the longest virtual edge kept (1 means no virtual edges).
        meta: free-form facts (model class name, input size, build time, ...).
    """

    nodes: list[Node]
    adj: np.ndarray
    ve_cutoff: int = 50
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def op_indices(self) -> np.ndarray:
        """Primitive index of every node, shape ``(n,)``."""
        return np.fromiter((PRIMITIVE_INDEX[n.op] for n in self.nodes), dtype=np.int64, count=len(self.nodes))

    @property
    def edges(self) -> np.ndarray:
        """Non-zero entries of :attr:`adj` as rows ``(source, target, value)`` in row-major order."""
        src, dst = np.nonzero(self.adj)
        return np.stack([src, dst, self.adj[src, dst]], axis=1).astype(np.int64)

    @property
    def direct_edges(self) -> np.ndarray:
        """Real edges (value 1) as rows ``(source, target)`` in row-major order."""
        src, dst = np.nonzero(self.adj == 1)
        return np.stack([src, dst], axis=1).astype(np.int64)

    # Views (implemented in ghnviz.graph.export) ------------------------------------------------

    def signature(self) -> str:
        """Hash of the architecture as a GHN sees it (op types, shapes, classifier flags, real
        edges, ve_cutoff); names are not part of it. Cheap enough for a cache key."""
        from .export import signature

        return signature(self)

    def summary(self) -> dict:
        """Node counts per op type, edges, parameters covered, depth, signature."""
        from .export import summary

        return summary(self)

    def to_frame(self):
        """``pandas.DataFrame`` with one row per node."""
        from .export import to_frame

        return to_frame(self)

    def to_networkx(self, virtual: bool = False):
        """``networkx.DiGraph``; edge attributes ``length`` and ``virtual`` (virtual edges only if asked)."""
        from .export import to_networkx

        return to_networkx(self, virtual=virtual)

    def to_dict(self, virtual: bool = True) -> dict:
        """Plain data (nodes, ``[source, target, length]`` edges, meta) for JSON and caches."""
        from .export import to_dict

        return to_dict(self, virtual=virtual)

    @classmethod
    def from_dict(cls, data: dict) -> ComputationGraph:
        """Inverse of :meth:`to_dict`."""
        from .export import from_dict

        return from_dict(data)

    def to_json(self, virtual: bool = False, indent: int | None = None) -> str:
        """JSON text (real edges only unless ``virtual``)."""
        from .export import to_json

        return to_json(self, virtual=virtual, indent=indent)

    def to_dot(self, virtual: bool = False) -> str:
        """Graphviz DOT text."""
        from .export import to_dot

        return to_dot(self, virtual=virtual)
