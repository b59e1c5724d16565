"""Run a model once and read its autograd graph: the raw material of :func:`ghnviz.build_graph`.

The raw graph has one node per autograd op, except that an op consuming parameters directly
(a convolution, ``addmm``, a norm layer, ...) is replaced by one node per such parameter: the
first parameter stands for the op's input side, the last for its output side, and the op's
parameters are chained. Edges follow the forward direction, except that an edge into a node whose
name contains ``bias`` points away from the consumer (so a weight precedes its bias).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

# autograd ops whose kernel size is kept (the GHN's shape encoder reads it for pooling nodes)
_POOL_OPS = ('MaxPool2DWithIndicesBackward', 'AvgPool2DBackward')


@dataclass
class RawGraph:
    """Autograd nodes in discovery order (a depth-first walk from the outputs) and their edges.

    Attributes:
        names: node name: ``<module path>.<attribute>`` for parameters, grad_fn class name otherwise.
        params: canonical ``named_parameters()`` name of the tensor, None for op nodes.
        modules: module owning the parameter, None for op nodes.
        module_names: dotted path of that module.
        shapes: parameter shape, None for op nodes.
        kernels: pooling kernel size for pooling ops, else None.
        edges: set of ``(source, target)`` node indices.
        all_params: every parameter name of the model (``named_parameters()`` order).
    """

    names: list[str] = field(default_factory=list)
    params: list[str | None] = field(default_factory=list)
    modules: list[nn.Module | None] = field(default_factory=list)
    module_names: list[str | None] = field(default_factory=list)
    shapes: list[tuple[int, ...] | None] = field(default_factory=list)
    kernels: list[tuple[int, ...] | None] = field(default_factory=list)
    edges: set[tuple[int, int]] = field(default_factory=set)
    all_params: list[str] = field(default_factory=list)

    def add(self, name, param=None, module=None, module_name=None, shape=None, kernel=None) -> int:
        self.names.append(name)
        self.params.append(param)
        self.modules.append(module)
        self.module_names.append(module_name)
        self.shapes.append(shape)
        self.kernels.append(kernel)
        return len(self.names) - 1

    def __len__(self) -> int:
        return len(self.names)


def parameter_owners(model: nn.Module) -> tuple[dict[int, tuple[str, nn.Module, str]], dict[int, str]]:
    """Who owns each parameter tensor, from one walk over ``named_modules()``.

    Returns:
        ``id(param) -> (node name, owning module, module path)``: a tensor registered in several
        modules (tied weights) goes to the last one visited, and the root module's own parameters
        are named ``'.<attr>'`` (graph node naming);
        ``id(param) -> name`` as ``model.named_parameters()`` gives it (first registration).
    """
    owners, canonical = {}, {}
    for mod_name, mod in model.named_modules():
        for attr, p in mod._parameters.items():
            if p is not None:
                owners[id(p)] = (f'{mod_name}.{attr}', mod, mod_name)
                canonical.setdefault(id(p), f'{mod_name}.{attr}' if mod_name else attr)
    return owners, canonical


def walk_autograd(outputs: Sequence[torch.Tensor], model: nn.Module) -> RawGraph:
    """Build the raw graph of ``outputs`` (tensors produced by ``model``) by walking ``grad_fn``.

    The walk is a pre-order depth-first traversal over ``next_functions`` from each output in turn;
    node discovery order matters because later passes break ties by position.
    """
    owners, canonical = parameter_owners(model)
    g = RawGraph(all_params=list(canonical.values()))
    node_of: dict[object, int] = {}  # autograd node (AccumulateGrad for parameters) -> raw node
    # autograd node -> (node standing for its output side, name used for the edge direction rule)
    seen: dict[object, tuple[int | None, str]] = {}
    pending: list[tuple[int, object]] = []  # (input-side node of a consumer, producer autograd node)

    def register_leaf(acc) -> int | None:
        k = node_of.get(acc)
        if k is not None:
            return k
        var = acc.variable
        owner = owners.get(id(var))
        if owner is None:  # a leaf tensor that is not a parameter of the model
            return None
        name, mod, mod_name = owner
        k = g.add(name, canonical.get(id(var), name), mod, mod_name, tuple(var.shape))
        node_of[acc] = k
        return k

    for out in outputs:
        stack = [out.grad_fn]
        while stack:
            fn = stack.pop()
            if fn in seen:
                continue
            fn_name = type(fn).__name__
            nxt = fn.next_functions
            first = last = None
            if 'AccumulateGrad' not in fn_name:
                for child, _ in nxt:
                    if child is not None and hasattr(child, 'variable'):
                        k = register_leaf(child)
                        if k is None:
                            continue
                        seen[child] = (k, g.names[k])
                        if first is None:
                            first = k
                        last = k
                if first is None:
                    kernel = None
                    if fn_name.startswith(_POOL_OPS):
                        kernel = tuple(int(v) for v in getattr(fn, '_saved_kernel_size', (3, 3)))
                    first = last = g.add(fn_name, kernel=kernel)
                    node_of[fn] = first
            seen[fn] = (last, fn_name)
            children = [c for c, _ in nxt if c is not None]
            for child in children:
                pending.append((first, child))
            stack.extend(reversed(children))

    edges = g.edges
    for consumer, child in pending:
        link, name = seen[child]
        if link is None or consumer is None or link == consumer:
            continue
        edges.add((consumer, link) if 'bias' in name else (link, consumer))
    return g
