"""``build_graph``: an ``nn.Module`` -> :class:`~ghnviz.graph.core.ComputationGraph`.

The graph is the one the published GHN-2/GHN-3 code builds for a model (same nodes, node order,
names, primitive types and edges), so a GHN with official weights sees what it was trained on:

1. run the model once on a random image batch with autograd on, and walk the autograd graph
   (:mod:`ghnviz.graph.trace`);
2. drop ops and parameters that are not DeepNets-1M primitives, rewiring around them, and
   decide which ``Mean``/``Mul``/``Add``/``Cat`` ops stay (:mod:`ghnviz.graph.passes`);
3. repair edge directions around weights, softmaxes and (for Swin) patch merging, then drop
   sums/concats left with a single input;
4. add the input node, sort topologically, apply per-family adjustments (position-encoding sum
   for ViTs and DeepNets-1M networks, pooling before the classifier for SqueezeNet);
5. add virtual edges (shortest-path lengths up to ``ve_cutoff``).

What the trace leaves out: parameters of modules without a primitive type (``nn.Conv1d``,
``nn.LSTM``, ``GroupNorm``, ConvNeXt's ``layer_scale``, class tokens, norm-layer biases, ...)
get no node; ``ComputationGraph.meta['params_without_node']`` lists them. Norm biases are still
predicted by a GHN together with their norm weight; the others are not.

Where this builder deliberately differs from the published one (the graphs are the same: checked
node by node and edge by edge on all 80 torchvision classifiers and on DeepNets-1M networks):

* tracing uses a batch of 1 (2 if that fails) and, by default, skips the arithmetic of expensive
  kernels (:mod:`ghnviz.graph.shape_only`); the published code runs a full forward on 2 images;
* the model and the global RNG are left as they were (a training-mode forward would update
  batch-norm running statistics and draw dropout masks from the global generator);
* subclasses of supported layer types are typed like their base, and leaf tensors that are not
  parameters are ignored (both make the published code raise ``KeyError``); models with an
  ``nn.LSTM`` build (the published constructor fails at its end on the LSTM's boolean ``bias``);
* there is no ``dense`` flag: in the published code it only selects the container format.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

from ..fastops import reference_kernels
from . import passes
from .core import ComputationGraph, Node
from .ops_table import module_rule, op_primitive
from .shape_only import ShapeOnly
from .trace import RawGraph, walk_autograd

log = logging.getLogger(__name__)

__all__ = ['build_graph', 'default_input_size', 'virtual_edges']

_DEFAULT_SIDE = 224  # ImageNet-sized input unless the model says otherwise
_INCEPTION_SIDE = 299


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """Input size ``(C, H, W)`` used for tracing: ``model.expected_input_sz`` if set, else 224x224
    (299x299 for torchvision's Inception-v3)."""
    import torchvision

    sz = getattr(model, 'expected_input_sz', None)
    if sz is None:
        sz = _INCEPTION_SIDE if isinstance(model, torchvision.models.Inception3) else _DEFAULT_SIDE
    return tuple(sz) if isinstance(sz, (tuple, list)) else (3, sz, sz)


def _outputs(out) -> list[torch.Tensor]:
    """Tensors whose autograd graphs are walked (tuples, lists and dict values are unpacked)."""
    if isinstance(out, dict):
        out = list(out.values())
    elif not isinstance(out, (tuple, list)):
        out = [out]
    return [o for o in out if isinstance(o, torch.Tensor)]


def _norm_state(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Snapshots of the running statistics a training-mode forward would update."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            for buf in m.buffers(recurse=False):
                if buf is not None and buf.device.type != 'meta':
                    saved.append((buf, buf.detach().clone()))
    return saved


def _forward(model: nn.Module, x: torch.Tensor | None, shape_only: bool, device: torch.device):
    """One forward pass with autograd on (``x`` None: ``model.get_var()``), global RNG untouched."""
    cuda = [device.index or 0] if device.type == 'cuda' else []  # the CPU generator is always restored
    with torch.random.fork_rng(devices=cuda), torch.enable_grad(), reference_kernels():
        with ShapeOnly() if shape_only else contextlib.nullcontext():
            return model.get_var() if x is None else model(x)


def _run_model(
    model: nn.Module, input_size: tuple[int, ...], batch_sizes: Sequence[int], fast: bool
) -> tuple[list[torch.Tensor], int, bool]:
    """Forward a random batch with autograd on; returns (outputs, batch size used, fast mode used).

    The model's mode is kept (it shapes the graph: dropout, stochastic depth, auxiliary heads);
    norm-layer running statistics and the global RNG are restored afterwards, so building a graph
    leaves the model and the RNG as they were. Attempts go from cheapest (shape-only kernels,
    smallest batch) to a plain forward; the first that runs is used.
    """
    try:
        first = next(model.parameters())
    except StopIteration:
        raise ValueError(
            f'{type(model).__name__} has no parameters, so there is no graph of parameters to build'
        ) from None
    dtype = first.dtype if first.is_floating_point() else None
    gen = torch.Generator(device='cpu').manual_seed(0)
    saved = _norm_state(model)
    errors = []
    try:
        for shape_only in (True, False) if fast else (False,):
            for bs in batch_sizes:
                x = None
                if not hasattr(model, 'get_var'):
                    x = torch.randn(bs, *input_size, generator=gen).to(first.device, dtype)  # (bs, C, H, W)
                try:
                    out = _forward(model, x, shape_only, first.device)
                except Exception as e:  # noqa: BLE001 - any failure of user code is reported below
                    log.debug('forward (batch %d, shape_only=%s) failed: %r', bs, shape_only, e)
                    errors.append(e)
                    continue
                return _outputs(out), bs, shape_only
    finally:
        with torch.no_grad():
            for buf, old in saved:
                buf.copy_(old)
    err = errors[-1]
    raise ValueError(
        f'{type(model).__name__} failed on a random input of shape {(batch_sizes[-1], *input_size)}: '
        f'{type(err).__name__}: {err}. Pass input_size=(C, H, W) matching what the model expects '
        f'(or set model.expected_input_sz), or give the model a get_var() method returning its output.'
    ) from err


def _is_pos_enc_module(module) -> bool:
    import torchvision

    return module is not None and (
        type(module).__name__ == 'PosEnc' or isinstance(module, torchvision.models.vision_transformer.Encoder)
    )


def _has_pos_enc_sum(model: nn.Module) -> bool:
    """ViTs and DeepNets-1M networks get a ``sum`` node after their position encoding."""
    import torchvision

    is_deepnet = type(model).__name__ == 'Network' and hasattr(model, '_n_cells')
    return is_deepnet or isinstance(model, torchvision.models.VisionTransformer)


def cell_index(name: str, n_cells: int) -> int | None:
    """Cell of a node by its name (``cells.<k>.``); classifier/auxiliary nodes are in the last cell,
    stem/position-encoding nodes (and every node of single-cell models) in cell 0; None = unknown."""
    if 'cells.' in name:
        start = len('cells.')
        end = start + name[start:].find('.')
        try:
            return int(name[start:end])
        except ValueError:
            return None
    if name.startswith(('classifier', 'auxiliary')):
        return n_cells - 1
    if n_cells == 1 or name.startswith(('stem', 'pos_enc')):
        return 0
    return None


def lookup_name(name: str) -> str:
    """Name under which the GHN looks up a parameter node's module (DeepNets-1M conventions):
    everything before ``stem``/``pos_enc`` is dropped and ``_ops.<i>.<j>`` becomes ``_ops.<i>.op.<j>``."""
    for key in ('stem', 'pos_enc'):
        k = name.find(key)
        if k >= 0:
            name = name[k:]
            break
    parts = name.split('.')
    for i, s in enumerate(parts[:-2]):
        if s == '_ops' and parts[i + 2] != 'op' and parts[i + 2].isdigit():
            parts.insert(i + 2, 'op')
            return '.'.join(parts)
    return name


def virtual_edges(A: np.ndarray, ve_cutoff: int) -> np.ndarray:
    """Shortest directed path lengths up to ``ve_cutoff`` (0 = no path); 1 marks the real edges."""
    n = len(A)
    if ve_cutoff <= 1 or n == 0:
        return A.astype(np.int64)
    dist = dijkstra(csr_matrix(A, dtype=np.float64), directed=True, unweighted=True, limit=ve_cutoff)
    np.fill_diagonal(dist, np.inf)
    dist[~np.isfinite(dist)] = 0
    return dist.astype(np.int64)


def build_graph(
    model: nn.Module,
    ve_cutoff: int = 50,
    input_size: Sequence[int] | None = None,
    batch_size: int | None = None,
    fast: bool = True,
) -> ComputationGraph:
    """Build the computation graph a GHN sees for ``model``.

    Args:
        model: an image classifier (any ``nn.Module`` taking a ``(B, C, H, W)`` batch), in the
            mode it is to be predicted in (its mode is kept; tracing changes neither its
            parameters nor its running statistics).
        ve_cutoff: longest virtual edge kept (shortest-path length); 1 = real edges only.
        input_size: ``(C, H, W)`` of the tracing input; default :func:`default_input_size`.
        batch_size: tracing batch; default 1, retried with 2 if the forward fails (e.g. batch
            norm on 1x1 maps in training mode).
        fast: skip the arithmetic of expensive kernels while tracing (:mod:`ghnviz.graph.shape_only`);
            the graph is the same, several times faster. Falls back to a plain forward if the
            model fails that way; False always runs a plain forward.

    Returns:
        The graph; ``meta`` records the model class, input size, batch used, whether the
        shape-only trace was used, number of cells, timings, ``params_without_node`` (every
        parameter without a node) and ``norm_biases`` (those of them a GHN predicts anyway,
        together with their norm layer's weight).

    Raises:
        ValueError: ``model`` is not an ``nn.Module``, has no parameters, its forward fails on the
            tracing input, or its output does not depend on its parameters.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(
            f'build_graph expects a torch.nn.Module, got {type(model).__name__}; '
            f'construct the model first (e.g. torchvision.models.resnet18())'
        )
    t0 = time.perf_counter()
    size = tuple(int(s) for s in input_size) if input_size is not None else default_input_size(model)
    outs, bs, shape_only = _run_model(model, size, (batch_size,) if batch_size else (1, 2), fast)
    if not outs:
        raise ValueError(
            f'the forward of {type(model).__name__} returned no tensor (a tensor, or a tuple/list/dict '
            f'of tensors, is expected)'
        )
    outs = [o for o in outs if o.grad_fn is not None]
    if not outs:
        raise ValueError(
            f'the output of {type(model).__name__} does not depend on any parameter that requires '
            f'grad, so there is no graph to trace; enable requires_grad on its parameters'
        )
    raw = walk_autograd(outs, model)
    t_trace = time.perf_counter() - t0

    order, A = _reduce(raw, model)
    nodes, A = _finish(raw, order, A, model)
    adj = virtual_edges(A, ve_cutoff)

    n_cells = int(getattr(model, '_n_cells', 1))
    graph = ComputationGraph(nodes=_make_nodes(raw, nodes, n_cells), adj=adj, ve_cutoff=ve_cutoff)
    covered = {n.param for n in graph.nodes if n.param is not None}
    missing = [n for n in raw.all_params if n not in covered]
    graph.meta.update(
        model=type(model).__name__,
        input_size=size,
        batch_size=bs,
        shape_only=shape_only,
        n_cells=n_cells,
        params_without_node=missing,
        norm_biases=_norm_biases(model, missing, covered),
        time_trace_s=t_trace,
        time_build_s=time.perf_counter() - t0,
    )
    return graph


def _norm_biases(model: nn.Module, missing: list[str], covered: set[str]) -> list[str]:
    """Norm-layer biases among ``missing`` whose weight has a node (a GHN predicts them with it)."""
    out = []
    for name in missing:
        path, _, attr = name.rpartition('.')
        if attr == 'bias' and f'{path}.weight' in covered:
            module = model.get_submodule(path) if path else model
            if 'norm' in type(module).__name__.lower():
                out.append(name)
    return out


def _reduce(raw: RawGraph, model: nn.Module) -> tuple[list[int], np.ndarray]:
    """Steps 2-3: filtering, edge repairs, second filtering. Returns the node order and edges."""
    names = raw.names
    order = list(range(len(raw)))
    succ = {v: set() for v in order}
    pred = {v: set() for v in order}
    for a, b in raw.edges:
        succ[a].add(b)
        pred[b].add(a)

    # 'Mul' first (its neighbour heuristic needs the unfiltered order), then the unsupported
    # names, then the conditional ops
    patterns = ['Mul', *passes.unsupported_names(raw), 'Mean', 'Add', 'Cat']
    order = passes.filter_nodes(order, succ, pred, names, patterns)
    A = passes.to_dense(order, succ)

    passes.fix_weight_edges(order, A, names, raw.modules)
    passes.fix_softmax_edges(order, A, names)
    import torchvision

    if isinstance(model, torchvision.models.SwinTransformer):
        passes.fix_swin_edges(order, A, names)

    # the repairs can leave sums/concats with a single input
    succ, pred = passes.to_sets(order, A)
    order = passes.filter_nodes(order, succ, pred, names, ['Add', 'Cat'])
    return order, passes.to_dense(order, succ)


def _finish(raw: RawGraph, order: list[int], A: np.ndarray, model: nn.Module) -> tuple[list[int], np.ndarray]:
    """Step 4: input node, topological order, per-family adjustments."""
    n = len(order)
    A = np.pad(A, ((0, 1), (0, 1)))
    order = order + [raw.add('input')]
    sources = np.flatnonzero(~A.any(axis=0))
    for k in sources:
        if 'weight' in raw.names[order[k]]:
            A[n, k] = True

    np.fill_diagonal(A, False)
    topo = passes.topological_order(A)
    if topo is None:
        log.warning('%s: the graph has a cycle; nodes are kept in discovery order', type(model).__name__)
    else:
        order = [order[k] for k in topo]
        A = A[np.ix_(topo, topo)]

    if _has_pos_enc_sum(model):
        i = 0
        while i < len(order):
            if _is_pos_enc_module(raw.modules[order[i]]):
                # the encoding node keeps one edge into a new sum node, which takes over its edges
                order.insert(i + 1, raw.add('AddBackward0'))
                A = np.insert(np.insert(A, i, False, axis=0), i, False, axis=1)
                A[i, i + 1] = True
            i += 1
    else:
        import torchvision

        if isinstance(model, torchvision.models.SqueezeNet):
            if raw.names[order[-1]].startswith('MeanBackward') and raw.names[order[-3]].startswith(
                'classifier'
            ):
                # global pooling is listed before the classifier (node labels move, edges stay)
                order.insert(len(order) - 3, order[-1])
                del order[-1]
            else:
                log.warning('SqueezeNet graph has an unexpected head; pooling not moved')
    return order, A


def _make_nodes(raw: RawGraph, order: list[int], n_cells: int) -> list[Node]:
    """Step 5 (node side): primitive types, lookup names, cells, shapes and classifier flags."""
    nodes = []
    n = len(order)
    cell = 0
    for k, v in enumerate(order):
        name, module = raw.names[v], raw.modules[v]
        c = cell_index(name, n_cells)
        if c is not None:
            cell = c
        key = lookup_name(name)
        if module is not None:
            rule = module_rule(module)
            op = rule(module, key) if rule is not None else 'sum'
            shape = raw.shapes[v]
            info = key
        else:
            op = op_primitive(name)
            shape, info = None, None
            if 'pool' in op:
                kernel = raw.kernels[v] or (3, 3)
                shape, info = (1, 1, *kernel), op
        nodes.append(
            Node(
                name=name,
                op=op,
                param=raw.params[v],
                shape=shape,
                module=raw.module_names[v],
                is_cls_w=info is not None and k == n - 2 and '.weight' in info,
                is_cls_b=info is not None and k == n - 1 and '.bias' in info,
                cell=cell,
                lookup=info,
            )
        )
    return nodes
