"""From node embeddings to parameters written into a model.

The steps, shared by every GHN architecture:

1. *Plan* (once per graph, cached): which graph node stands for which parameter tensor, the block
   shape (the "key") its decoder call produces, how the block is fitted to the tensor, and which
   model tensors have no node (each recorded with a reason).
2. *Decode*: all nodes that share a key are decoded in one call.
3. *Fit*: crop the decoded block, tile it along the channel dimensions to the tensor's shape,
   rescale it (fan-in for weights, squashing for norms and biases), and write it into the model.

Keys group tensors of similar size: each channel count is clipped to the decoder's maximum, a
multiple of 3 becomes 4/3 of it, and anything at least half the maximum becomes the maximum.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ghnviz.graph.core import ComputationGraph

if TYPE_CHECKING:
    from ghnviz.hyper.ghn import GHN


@dataclass
class Prediction:
    """What :meth:`GHN.predict` did to one model.

    Attributes:
        model: the model, with predicted tensors written in place.
        predicted: names of the parameters that received predicted values (``named_parameters`` names).
        skipped: every parameter neither predicted nor filled, mapped to the reason it was not predicted.
        seconds: wall times: ``graph`` (building or fetching the graph), ``predict`` (GHN forward and
            writing), ``total`` and, with ``complete=True``, ``fill`` (part of ``total``). In a batched
            call the times are those of the whole batch.
        graph: the computation graph used.
        filled: parameters without a graph node that got a value by a rule (``predict(complete=True)``,
            see :mod:`ghnviz.hyper.extras`), mapped to the rule's label; empty otherwise. They are not in
            ``predicted``.
    """

    model: nn.Module
    predicted: list[str]
    skipped: dict[str, str]
    seconds: dict[str, float]
    graph: ComputationGraph | None = None
    filled: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Every parameter of the model was predicted or filled."""
        return not self.skipped

    def counts(self) -> dict[str, int]:
        """Tensors and scalar parameters: ``tensors_{predicted,filled,skipped,total}`` and
        ``params_{predicted,filled,skipped,total}``."""
        numel = {n: p.numel() for n, p in self.model.named_parameters()}
        out = {}
        for kind, names in (
            ('predicted', self.predicted),
            ('filled', self.filled),
            ('skipped', self.skipped),
        ):
            out[f'tensors_{kind}'] = sum(1 for n in names if n in numel)
            out[f'params_{kind}'] = sum(numel.get(n, 0) for n in names)
        out['tensors_total'] = len(numel)
        out['params_total'] = sum(numel.values())
        return out


@dataclass
class GraphEmbedding:
    """Embeddings of one architecture: ``vector`` is the mean over ``nodes`` (one row per graph node)."""

    vector: torch.Tensor  # (hid,)
    nodes: torch.Tensor  # (n_nodes, hid)
    graph: ComputationGraph


@dataclass
class Target:
    """One graph node that stands for a parameter tensor, and how to write its prediction."""

    node: int  # node index in its graph
    param: str  # parameter name in the model
    shape: tuple[int, ...]  # the tensor's shape
    key: tuple[int, ...]  # decoder block shape (groups tensors decoded together)
    is_cls: bool  # classifier weight or bias
    # (parameter name, its shape, row of a 1-D decoder output or None, is a weight) per tensor written
    writes: list[tuple[str, tuple[int, ...], int | None, bool]] = field(default_factory=list)


@dataclass
class GraphPlan:
    """Per-graph facts the predictor needs, independent of parameter values."""

    graph: ComputationGraph
    op_index: torch.Tensor  # (n,) primitive index of each node
    shape_index: torch.Tensor  # (n, 4) shape-encoder rows of each node
    targets: list[Target]
    unmatched: dict[str, str]  # parameter name -> reason it has no target


def _key_dim(size: int, cap: int) -> int:
    """Channel count of the decoder block used for a tensor dimension of ``size``."""
    n = min(size, cap)
    if n % 3 == 0:
        n = n // 3 * 4
    return cap if n >= cap / 2 else n


def decoder_key(
    shape: Sequence[int], max_shape: Sequence[int], is_cls_w: bool, is_cls_b: bool
) -> tuple[int, ...]:
    """The block shape decoded for a tensor; its length/sign also select the decoder (see ``GHN._decode``).

    ``(c, 0)``: norm weight or bias, ``(c, -1)``: classifier bias, ``(o, i)``: classifier weight,
    ``(o, i, kh, kw)``: other weights, ``(a, b, c)``: other 3-D tensors.
    """
    s = tuple(int(v) for v in shape)
    k = [_key_dim(s[j], max_shape[j]) for j in range(min(len(s), 3))]
    if len(s) == 1:
        return (k[0], -1 if is_cls_b else 0)
    if is_cls_w:
        return (k[0], k[1])
    if len(s) == 2:
        return (k[0], k[1], 1, 1)
    if len(s) == 3:
        if s[0] == 1 and min(s[1:]) > 1:  # position embedding (1, tokens, dim) seen as (1, dim, h, w)
            side = int(math.floor(s[1] ** 0.5))
            return (1, s[2], side, side)
        return tuple(k)
    return (k[0], k[1], s[2], s[3])


def plan_graph(ghn: GHN, graph: ComputationGraph, model: nn.Module) -> GraphPlan:
    """Match graph nodes to the model's tensors and precompute everything that depends only on shapes."""
    params = dict(model.named_parameters(remove_duplicate=False))
    max_shape = ghn.config.max_shape
    enc_shapes: list[tuple[int, ...] | None] = []
    targets: list[Target] = []
    for i, node in enumerate(graph.nodes):
        p = params.get(node.param) if node.param is not None else None
        if p is None:
            enc_shapes.append(tuple(node.shape) if node.shape is not None else None)
            continue
        shape = tuple(p.shape)
        enc_shapes.append(shape)
        is_w = not node.param.endswith('bias')
        key = decoder_key(shape, max_shape, node.is_cls_w, node.is_cls_b)
        is_cls = len(key) == 2 and key[1] != 0
        t = Target(i, node.param, shape, key, is_cls)
        if len(shape) == 1:
            t.writes.append((node.param, shape, 0 if is_w else 1, is_w))
            if is_w:  # a norm layer's bias has no node: it is decoded with the weight
                bias = node.param.rsplit('.', 1)[0] + '.bias' if '.' in node.param else 'bias'
                if bias in params:
                    t.writes.append((bias, tuple(params[bias].shape), 1, False))
        else:
            t.writes.append((node.param, shape, None, is_w))
        targets.append(t)

    written = {w[0] for t in targets for w in t.writes}
    unmatched = {
        name: _unmatched_reason(model, name, written)
        for name in dict(model.named_parameters())
        if name not in written
    }
    return GraphPlan(
        graph=graph,
        op_index=torch.as_tensor(graph.op_indices, dtype=torch.long),
        shape_index=ghn.shape_enc.shape_indices(enc_shapes),
        targets=targets,
        unmatched=unmatched,
    )


def _unmatched_reason(model: nn.Module, name: str, written: set[str]) -> str:
    path, _, attr = name.rpartition('.')
    module = model.get_submodule(path) if path else model
    kind = type(module).__name__
    own = [f'{path}.{n}' if path else n for n, _ in module.named_parameters(recurse=False)]
    if not any(n in written for n in own):
        return f'no graph node for {kind}.{attr}: the GHN does not support this layer type or tensor'
    return f'no graph node for {kind}.{attr} (only tensors that appear as graph nodes are predicted)'


def fit_tensor(
    w: torch.Tensor,
    target: Sequence[int],
    centred: bool,
    generator: torch.Generator | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Crop a decoded block and tile it along its channel dimensions to exactly ``target``.

    ``transform`` (elementwise, e.g. :func:`normalizer`) is applied between cropping and tiling, where
    the tensor is smallest; see :func:`crop_block` and :func:`tile_block`.
    """
    w = crop_block(w, target, centred, generator)
    if transform is not None:
        w = transform(w)
    return tile_block(w, target, centred)


def crop_block(
    w: torch.Tensor, target: Sequence[int], centred: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The part of a decoded block a tensor of shape ``target`` uses (before tiling).

    Leading channels are kept and, for kernels, the top-left (``centred=False``) or central window; a
    1-D/2-D target taken from a kernel block uses the kernel's centre tap. A position embedding
    ``(1, tokens, dim)`` is read from a ``(1, dim, s, s)`` block as ``s * s`` tokens, preceded by one class
    token drawn from N(0, 0.02^2) (with ``generator``, else torch's default generator, which is what
    reproduces published predictions bit for bit).
    """
    t = tuple(int(v) for v in target)
    s = w.shape
    if len(t) == 1:
        w = w[: t[0]]
        while w.dim() > 1:
            w = w[:, 0] if w.dim() == 2 else w[:, 0, w.shape[-2] // 2, w.shape[-1] // 2]
    elif len(t) == 2:
        w = w[: t[0], : t[1]]
        if w.dim() > 2:
            w = w[:, :, w.shape[-2] // 2, w.shape[-1] // 2]
    elif len(t) == 3:
        if len(s) > 3:  # position embedding
            w = w.reshape(s[0], s[1], -1).transpose(1, 2)[: t[0], : t[1], : t[2]]  # (1, tokens, dim)
            # drawn on the generator's device (a CPU generator then serves a GHN on any device)
            dev = generator.device if generator is not None else w.device
            token = torch.normal(0.0, 0.02, size=(1, 1, w.shape[2]), generator=generator, device=dev)
            w = torch.cat((token.to(w.device, w.dtype), w), dim=1)
        else:
            w = w[: t[0], : t[1], : t[2]]
    elif w.dim() > 2:
        w = _crop_kernel(w[: t[0], : t[1]], min(t[2], s[2]), min(t[3], s[3]) if len(s) > 3 else 1, centred)
    else:
        w = w[: t[0], : t[1]].unsqueeze(2).unsqueeze(3)
    return w


def tile_block(w: torch.Tensor, target: Sequence[int], centred: bool) -> torch.Tensor:
    """Repeat a cropped block along out- then in-channels (for 3-D tensors without in-tiling: the last
    dimension) and cut it to ``target``."""
    t = tuple(int(v) for v in target)
    s = w.shape
    if t[0] > s[0]:
        w = w.repeat(math.ceil(t[0] / s[0]), *([1] * (w.dim() - 1)))
    if len(t) > 1 and t[1] > s[1]:
        w = w.repeat(1, math.ceil(t[1] / s[1]), *([1] * (w.dim() - 2)))
    elif len(t) == 3 and len(s) == 3 and t[2] > s[2]:
        w = w.repeat(1, 1, math.ceil(t[2] / s[2]))
    if len(t) < 4:
        return w[tuple(slice(0, n) for n in t)]
    return _crop_kernel(w[: t[0], : t[1]], t[2], t[3], centred)


def tile_into(dst: torch.Tensor, block: torch.Tensor) -> bool:
    """Write ``dst[i, j, ...] = block[i % b0, j % b1, ...]`` without materialising the tiled tensor.

    Equal to :func:`tile_block` whenever the dimensions after the first two already match; returns False
    (writing nothing) otherwise.
    """
    if dst.dim() != block.dim() or dst.shape[2:] != block.shape[2:] or dst.dim() == 0:
        return False
    if dst.dim() == 1:
        dst, block = dst.unsqueeze(1), block.unsqueeze(1)
    (t0, t1), (b0, b1) = dst.shape[:2], block.shape[:2]
    if b0 > t0 or b1 > t1:
        return False
    q0, q1 = t0 // b0, t1 // b1
    for rows, n_rows, src_rows in (
        (slice(0, q0 * b0), q0, block),
        (slice(q0 * b0, t0), 1, block[: t0 - q0 * b0]),
    ):
        if src_rows.shape[0] == 0:
            continue
        for cols, n_cols, src in (
            (slice(0, q1 * b1), q1, src_rows),
            (slice(q1 * b1, t1), 1, src_rows[:, : t1 - q1 * b1]),
        ):
            if src.shape[1] == 0:
                continue
            part = dst[rows, cols].unflatten(1, (n_cols, src.shape[1])).unflatten(0, (n_rows, src.shape[0]))
            part.copy_(src[None, :, None].expand(n_rows, -1, n_cols, *src.shape[1:]))
    return True


def _crop_kernel(w: torch.Tensor, h: int, wd: int, centred: bool) -> torch.Tensor:
    if not centred:
        return w[:, :, :h, :wd]
    oy, ox = w.shape[-2] // 2, w.shape[-1] // 2
    return w[:, :, oy - h // 2 : oy + math.ceil(h / 2), ox - wd // 2 : ox + math.ceil(wd / 2)]


def normalizer(target: Sequence[int], is_w: bool) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The rescaling GHN-2 applies to a predicted tensor of shape ``target`` (elementwise; None = keep).

    Weights with more than one dimension are scaled by ``sqrt(beta / fan_in)`` (``beta = 1`` for
    depthwise or ``kh < kw`` kernels, which are not followed by a ReLU, else 2); a position embedding
    ``(1, c, >= 11, ...)`` is left as is. 1-D norm weights become ``2 * sigmoid(p / 2)``, biases
    ``tanh(p / 5)``.
    """
    sz = tuple(target)
    if len(sz) > 1:
        if len(sz) > 2 and sz[2] >= 11 and sz[0] == 1:
            return None
        beta = 1.0 if len(sz) > 2 and (sz[1] == 1 or sz[2] < sz[3]) else 2.0
        scale = (beta / math.prod(sz[1:])) ** 0.5
        return lambda w: w * scale
    if is_w:
        return lambda w: 2 * torch.sigmoid(0.5 * w)
    return lambda w: torch.tanh(0.2 * w)


def use_batch_statistics(model: nn.Module) -> nn.Module:
    """Make every ``BatchNorm2d`` normalise with the statistics of the current batch, also in eval mode.

    Predicted parameters come without running statistics; this is how GHN-2 evaluates them
    (``track_running_stats=False`` and ``training=True`` on each BN layer). Returns the model.
    """
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.training = True
    return model


class LRU(OrderedDict):
    """A tiny least-recently-used dict."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get(self, key: Any, default: Any = None) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def put(self, key: Any, value: Any) -> Any:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)
        return value


# nn.Module bookkeeping attributes that do not describe the computation.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` if it is plain data (numbers, strings, nested tuples/lists of them), else None."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list) and depth < 4 and len(value) <= 64:
        items = tuple(_plain(v, depth + 1) for v in value)
        return items if all(i is not None or v is None for i, v in zip(items, value)) else None
    return None


def model_key(model: nn.Module, ve_cutoff: int) -> tuple:
    """A key equal for two models whose traced graphs are equal.

    It covers the module tree with each module's class, forward code and plain attributes (e.g. the
    wiring of a DeepNets-1M cell, which the module tree alone does not show), the parameter shapes and
    the input size used for tracing.
    """
    modules = []
    for name, m in model.named_modules():
        attrs = tuple(
            sorted(
                (k, p)
                for k, v in vars(m).items()
                if k not in _MODULE_INTERNALS and (p := _plain(v)) is not None
            )
        )
        modules.append((name, type(m).__module__, type(m).__qualname__, type(m).forward.__code__, attrs))
    shapes = tuple((n, tuple(p.shape)) for n, p in model.named_parameters(remove_duplicate=False))
    return (tuple(modules), shapes, model.training, str(getattr(model, 'expected_input_sz', None)), ve_cutoff)
