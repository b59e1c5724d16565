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
    """

    name: str
    op: str
    param: str | None = None
    shape: tuple[int, ...] | None = None
    module: str | None = None
    is_cls_w: bool = False
    is_cls_b: bool = False

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
