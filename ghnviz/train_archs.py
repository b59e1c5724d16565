"""Training architectures for GHN meta-training: shape-only networks with cached graphs, and the fast path.

* :class:`ArchSampler` draws meta-batches of DeepNets-1M architectures (per rank under DDP), enforces the
  node budget and keeps each (architecture, width) built once, as a :class:`TrainArch`;
* :func:`prepare_arch` builds the network on the ``meta`` device (shapes only), traces its graph and prunes
  ops whose parameters have no graph node (they cannot reach the output, e.g. cell nodes left out of the
  concatenation), so they are not computed; under autocast its grouped (depthwise) convolutions run in
  float32, whose backward is about twice as fast as bf16's on CPUs;
* :func:`predict_params` runs ONE GHN forward for a whole meta-batch and returns the predicted tensors by
  parameter name, differentiable back to the GHN; :func:`meta_batch_loss` runs every network on the same
  images with :func:`torch.func.functional_call` (no module is rebuilt or written into).

The result equals :meth:`ghnviz.hyper.ghn.GHN.predict` into a freshly built network (tested).
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from ghnviz.train import TrainConfig

# Modules whose forward the network skips when one of their weights is None (see zoo ``is_pruned``).
_PRUNABLE = re.compile(r'^(cells\.\d+\.(_ops\.\d+|preprocess[01])|stem1)$')


@dataclass
class TrainArch:
    """A training architecture ready for steps: shape-only network, graph, and fill-ins for dead tensors."""

    name: str  # e.g. 'train/17 C=48 fc=128'
    model: nn.Module  # parameters on the meta device; predicted tensors are passed in at call time
    graph: Any  # ComputationGraph
    fill: dict[
        str, torch.Tensor
    ]  # parameters without a graph node that still run: zeros (never used by the output)

    @property
    def n_nodes(self) -> int:
        return self.graph.n_nodes


def _grouped_conv_fp32(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Conv2d.forward that leaves autocast for float32 (grouped convolutions are slower in bf16 on CPUs)."""
    if not torch.is_autocast_enabled(x.device.type):
        return self._conv_forward(x, self.weight, self.bias)
    with torch.autocast(x.device.type, enabled=False):
        bias = None if self.bias is None else self.bias.float()
        return self._conv_forward(x.float(), self.weight.float(), bias)  # (B, C_out, H', W')


def prepare_arch(spec, num_classes: int, ve_cutoff: int, name: str = '') -> TrainArch:
    """Build a shape-only network and its graph; prune ops whose parameters do not reach the output."""
    from ghnviz.graph.build import build_graph

    model = spec.build(num_classes=num_classes, is_imagenet_input=False, light=True).train()
    graph = build_graph(model, ve_cutoff=ve_cutoff)
    live = {n.param for n in graph.nodes if n.param is not None} | set(graph.meta.get('norm_biases', ()))
    for path, module in model.named_modules():
        if _PRUNABLE.match(path):
            own = [n for n, _ in module.named_parameters()]
            if own and not any(f'{path}.{n}' in live for n in own):
                for sub in module.modules():
                    for pname in list(sub._parameters):
                        sub._parameters[pname] = None
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1:  # depthwise: backward 2x faster in fp32
            module.forward = types.MethodType(_grouped_conv_fp32, module)
    fill = {
        n: torch.zeros((), dtype=p.dtype).expand(p.shape)
        for n, p in model.named_parameters()
        if n not in live
    }
    return TrainArch(name or str(spec.name), model, graph, fill)


class ArchSampler:
    """Endless stream of meta-batches of training architectures for one rank.

    Indices ``0..pool-1`` of the split are visited in a random order that is re-drawn every pass; under
    DDP every rank reads the same order with stride ``world`` (so ranks never share an architecture in a
    pass). Widths are redrawn per use (``resample_width``), meta-batches over ``max_nodes`` are dropped.
    """

    def __init__(self, cfg: TrainConfig, num_classes: int, ve_cutoff: int, rank: int = 0, world: int = 1):
        from ghnviz.zoo.deepnets1m.space import SPLITS

        if cfg.split not in SPLITS:
            raise ValueError(f'unknown split {cfg.split!r}; valid: {sorted(SPLITS)}')
        size = SPLITS[cfg.split].size
        self.cfg, self.num_classes, self.ve_cutoff = cfg, num_classes, ve_cutoff
        self.pool = min(cfg.arch_pool, size) if cfg.arch_pool > 0 else size
        self.rank, self.world = rank, world
        self.order_rng = np.random.default_rng([cfg.seed, 1])  # shared by ranks: same pass order
        self.width_rng = np.random.default_rng([cfg.seed, 2, rank])
        self._pass_state = self.order_rng.bit_generator.state
        self._order = self.order_rng.permutation(self.pool)
        self.pos = rank
        self.cache: OrderedDict[tuple, TrainArch] = OrderedDict()
        self.nodes: dict[int, int] = {}  # index -> node count (does not depend on width)
        self.dropped = 0  # meta-batches dropped for the node budget
        self.hits = self.misses = 0

    def _next_index(self) -> int:
        while True:
            if self.pos >= self.pool:
                self._pass_state = self.order_rng.bit_generator.state
                self._order = self.order_rng.permutation(self.pool)
                self.pos = self.rank
            i = int(self._order[self.pos])
            self.pos += self.world
            if self.cfg.max_cells <= 0:
                return i
            from ghnviz.zoo.deepnets1m.space import sample_architecture

            if sample_architecture(self.cfg.split, i).n_cells <= self.cfg.max_cells:
                return i

    def _draw(self, index: int):
        """The spec of ``index`` with its width for this use (always consumes the same random numbers)."""
        from ghnviz.zoo.deepnets1m.space import sample_architecture

        spec = sample_architecture(self.cfg.split, index)
        if self.cfg.resample_width and spec.params_c32 is not None:
            spec = spec.resample_width(self.width_rng)
        if self.cfg.max_width > 0 and spec.C > self.cfg.max_width:
            spec = dataclasses.replace(spec, C=self.cfg.max_width)
        return spec

    def _get(self, index: int, spec) -> TrainArch:
        key = (index, spec.C, spec.fc_dim)
        arch = self.cache.get(key)
        if arch is not None:
            self.cache.move_to_end(key)
            self.hits += 1
            return arch
        self.misses += 1
        arch = prepare_arch(
            spec, self.num_classes, self.ve_cutoff, f'{spec.name} C={spec.C} fc={spec.fc_dim}'
        )
        self.nodes[index] = arch.n_nodes
        self.cache[key] = arch
        while len(self.cache) > self.cfg.cache_size:
            self.cache.popitem(last=False)
        return arch

    def next_batch(self) -> list[TrainArch]:
        """``meta_batch`` architectures whose graphs have at most ``max_nodes`` nodes in total."""
        for _ in range(10_000):
            idx = [self._next_index() for _ in range(self.cfg.meta_batch)]
            specs = [self._draw(i) for i in idx]
            if sum(self.nodes.get(i, 0) for i in idx) <= self.cfg.max_nodes:  # skip building known misfits
                archs = [self._get(i, s) for i, s in zip(idx, specs)]
                if sum(a.n_nodes for a in archs) <= self.cfg.max_nodes:
                    return archs
            self.dropped += 1
        raise RuntimeError(
            f'no meta-batch of {self.cfg.meta_batch} architectures fits {self.cfg.max_nodes} nodes'
        )

    def state_dict(self) -> dict:
        return {
            'order_pass': self._pass_state,
            'order_now': self.order_rng.bit_generator.state,
            'width': self.width_rng.bit_generator.state,
            'pos': self.pos,
            'dropped': self.dropped,
        }

    def load_state_dict(self, state: dict) -> None:
        self.order_rng.bit_generator.state = state['order_pass']
        self._order = self.order_rng.permutation(self.pool)
        self.order_rng.bit_generator.state = state['order_now']
        self._pass_state = state['order_pass']
        self.width_rng.bit_generator.state = state['width']
        self.pos, self.dropped = int(state['pos']), int(state['dropped'])


def predict_params(ghn: nn.Module, archs: list[TrainArch]) -> list[dict[str, torch.Tensor]]:
    """One GHN forward for all architectures; per architecture, its predicted tensors by parameter name.

    The tensors keep the autograd graph back to the GHN (a loss on the networks' outputs trains it).
    """
    from ghnviz.hyper.predict import crop_block, normalizer, tile_block

    batch = ghn.make_batch([a.graph for a in archs], [a.model for a in archs])
    x = ghn.node_embeddings(batch)  # (N, hid)
    out: list[dict[str, torch.Tensor]] = [dict(a.fill) for a in archs]
    for key, (idx, members) in batch.groups.items():
        w = ghn._decode(key, x.index_select(0, idx))  # (k, ...) one decoded block per node
        for j, (gi, t) in enumerate(members):
            for name, shape, row, is_w in t.writes:
                block = crop_block(w[j] if row is None else w[j, row], shape, ghn.centred)
                norm = normalizer(shape, is_w) if ghn.config.weight_norm else None
                if norm is not None:
                    block = norm(block)
                value = tile_block(block, shape, ghn.centred)
                if tuple(value.shape) != tuple(shape):
                    raise ValueError(
                        f'{archs[gi].name}: a decoded block {tuple(block.shape)} cannot fill {name} '
                        f'{tuple(shape)}; the GHN max_shape {tuple(ghn.config.max_shape)} is too small for it'
                    )
                out[gi][name] = value
    return out


class MetaBatchPredictor(nn.Module):
    """The GHN as one module whose forward predicts a meta-batch (what DDP wraps)."""

    def __init__(self, ghn: nn.Module):
        super().__init__()
        self.ghn = ghn

    def forward(self, holder: ArchBatch) -> list[dict[str, torch.Tensor]]:
        return predict_params(self.ghn, holder.archs)


class ArchBatch:
    """Plain holder, so DDP passes the architectures through untouched."""

    def __init__(self, archs: list[TrainArch]):
        self.archs = archs


def meta_batch_loss(
    archs: list[TrainArch],
    params: list[dict[str, torch.Tensor]],
    images: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
    amp_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the networks on the same images; also the number of correct predictions."""
    losses, correct = [], torch.zeros((), dtype=torch.long, device=images.device)
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        for arch, p in zip(archs, params):
            out = torch.func.functional_call(arch.model, p, (images,), strict=False)
            logits = (out[0] if isinstance(out, tuple) else out).float()  # (B, num_classes)
            losses.append(F.cross_entropy(logits, targets, label_smoothing=label_smoothing))
            correct = correct + (logits.detach().argmax(1) == targets).sum()
    return torch.stack(losses).mean(), correct
