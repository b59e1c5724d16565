"""Graph hypernetworks: the shared base class :class:`GHN` and the architecture registry.

Every architecture shares node embedding (primitive + shape), the decoders and the whole prediction
path (:meth:`GHN.predict`, :meth:`GHN.embed`); an architecture only supplies its graph network.

Adding an architecture:

1. subclass :class:`GHN` (and :class:`~ghnviz.hyper.config.GHNConfig` if it has more settings, set as
   ``config_class``); implement :meth:`GHN.build_gnn`, :meth:`GHN.prepare` (per-batch precomputation,
   cached) and :meth:`GHN.propagate`; set ``centred`` / ``conv_layout`` for its decoder rules;
2. implement the classmethods :meth:`GHN.recognises`, :meth:`GHN.config_from_state_dict` (for files
   without a stored config) and, if needed, :meth:`GHN.adapt_state_dict`;
3. decorate it with ``@register_ghn('<name>')`` and add its module to :data:`BUILTIN_MODULES`, so that
   :func:`ghnviz.load_ghn` finds it without an explicit import.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ghnviz.graph.core import PRIMITIVES, ComputationGraph
from ghnviz.hyper.config import GHNConfig
from ghnviz.hyper.decoder import ConvDecoder
from ghnviz.hyper.extras import FillConfig, fill_missing
from ghnviz.hyper.layers import MLP, ShapeEncoder
from ghnviz.hyper.predict import (
    LRU,
    GraphEmbedding,
    GraphPlan,
    Prediction,
    Target,
    crop_block,
    model_key,
    normalizer,
    plan_graph,
    tile_block,
    tile_into,
)

log = logging.getLogger(__name__)

# ``predict(autocast=...)`` names -> dtype of the GHN forward (decoders always run in float32).
AUTOCAST_DTYPES: dict[str, torch.dtype] = {'bf16': torch.bfloat16, 'fp16': torch.float16}

# Architecture name -> module that registers it (imported on first lookup).
BUILTIN_MODULES: dict[str, str] = {'ghn2': 'ghnviz.hyper.ghn2', 'ghn3': 'ghnviz.hyper.ghn3'}
_REGISTRY: dict[str, type[GHN]] = {}


def register_ghn(name: str):
    """Class decorator: make a :class:`GHN` subclass loadable under ``name`` (its ``arch``)."""

    def wrap(cls: type[GHN]) -> type[GHN]:
        cls.arch = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def ghn_classes() -> dict[str, type[GHN]]:
    """All registered architectures (importing the built-in ones that are installed)."""
    for name, module in BUILTIN_MODULES.items():
        if name not in _REGISTRY:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name != module:
                    raise
    return dict(_REGISTRY)


def get_ghn_class(name: str) -> type[GHN]:
    """The class registered as ``name``; ``ValueError`` lists the valid names otherwise."""
    classes = ghn_classes()
    if name not in classes:
        raise ValueError(f'unknown GHN architecture {name!r}; known: {sorted(classes)}')
    return classes[name]


@dataclass
class GraphBatch:
    """Graphs planned for one GHN forward: nodes are numbered graph after graph."""

    plans: list[GraphPlan]
    offsets: list[int]  # first node of each graph; offsets[-1] = total nodes
    op_index: torch.Tensor  # (N,)
    shape_index: torch.Tensor  # (N, 4)
    # decoder key -> (node indices (k,), [(graph position, target)]), in order of first appearance
    groups: dict[tuple, tuple[torch.Tensor, list[tuple[int, Target]]]]
    prepared: Any = None  # what the architecture's prepare() returned
    extra: dict = field(default_factory=dict)

    @property
    def graphs(self) -> list[ComputationGraph]:
        return [p.graph for p in self.plans]


class GHN(nn.Module):
    """Base graph hypernetwork: embeds a graph's nodes, propagates, decodes and writes parameters."""

    arch: ClassVar[str] = ''
    config_class: ClassVar[type[GHNConfig]] = GHNConfig
    centred: ClassVar[bool] = False  # decoder crop / tiling window: centred (GHN-3) or top-left (GHN-2)
    conv_layout: ClassVar[bool] = True  # decoder 1x1 layers stored as conv weights (GHN-2 files)

    def __init__(self, config: GHNConfig | None = None, **kwargs: Any):
        super().__init__()
        config = config if config is not None else self.config_class(**kwargs)
        if config.decoder != 'conv':
            raise ValueError(
                f'decoder {config.decoder!r} is not supported (only the convolutional decoder is)'
            )
        self.config = config
        hid, max_ch = config.hid, max(config.max_shape[:2])
        if config.layernorm:
            self.ln = nn.LayerNorm(hid)
        # Registered under the state-dict name 'embed'; the public method embed() shadows the attribute,
        # so the layer is reached through `op_embed`.
        self._modules['embed'] = nn.Embedding(len(PRIMITIVES), hid)
        self.shape_enc = ShapeEncoder(hid, config.num_classes, config.max_shape)
        self.gnn = self.build_gnn()
        self.decoder = ConvDecoder(
            hid, (hid * 4, hid * 8), config.max_shape, config.num_classes, self.conv_layout, self.centred
        )
        self.decoder_1d = MLP(hid, (hid * 2, 2 * max_ch), last_relu=False)
        self.bias_class = nn.Sequential(nn.ReLU(), nn.Linear(max_ch, config.num_classes))
        self._init_caches()

    def _init_caches(self) -> None:
        self._lock = threading.Lock()
        self._graphs = LRU(8)  # model key -> graph
        self._plans = LRU(32)  # id(graph) -> (weakref to graph, plan)
        self._batches = LRU(8)  # (ids of plans, device) -> GraphBatch

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for k in ('_lock', '_graphs', '_plans', '_batches'):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_caches()

    # ---- architecture hooks -------------------------------------------------------------------------
    def build_gnn(self) -> nn.Module:
        """The graph network (registered as ``self.gnn``)."""
        raise NotImplementedError

    def prepare(self, batch: GraphBatch) -> Any:
        """Precompute what :meth:`propagate` needs for this batch (cached with the batch)."""
        return None

    def propagate(self, x: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
        """``(N, hid)`` initial node embeddings -> propagated embeddings."""
        raise NotImplementedError

    @classmethod
    def recognises(cls, state_dict: dict[str, torch.Tensor]) -> bool:
        """Whether a state dict (of a file without an ``arch``) belongs to this architecture."""
        return False

    @classmethod
    def config_from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> GHNConfig:
        """Infer the config of a file that stores none from its tensor names and shapes."""
        raise NotImplementedError

    @classmethod
    def adapt_state_dict(
        cls, state_dict: dict[str, torch.Tensor], config: GHNConfig
    ) -> dict[str, torch.Tensor]:
        """Convert tensors of a foreign layout (e.g. 2-D vs 4-D 1x1 weights) before a strict load."""
        return state_dict

    # ---- helpers --------------------------------------------------------------------------------------
    @property
    def op_embed(self) -> nn.Embedding:
        """The primitive-type embedding table (state-dict name ``embed``)."""
        return self._modules['embed']

    @property
    def device(self) -> torch.device:
        return self.op_embed.weight.device

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def graph_for(self, model: nn.Module) -> ComputationGraph:
        """The computation graph of ``model`` (cached by architecture, so the same layout is traced once)."""
        key = model_key(model, self.config.ve_cutoff)
        with self._lock:
            graph = self._graphs.get(key)
        if graph is None:
            from ghnviz.graph.build import build_graph

            graph = build_graph(model, ve_cutoff=self.config.ve_cutoff)
            with self._lock:
                self._graphs.put(key, graph)
        return graph

    def _plan(self, graph: ComputationGraph, model: nn.Module) -> GraphPlan:
        with self._lock:
            hit = self._plans.get(id(graph))
        if hit is not None and hit[0]() is graph:
            return hit[1]
        plan = plan_graph(self, graph, model)
        with self._lock:
            self._plans.put(id(graph), (weakref.ref(graph), plan))
        return plan

    def make_batch(self, graphs: Sequence[ComputationGraph], models: Sequence[nn.Module]) -> GraphBatch:
        """Plan and join graphs for one forward (cached for repeated calls with the same graphs)."""
        plans = [self._plan(g, m) for g, m in zip(graphs, models)]
        key = (tuple(id(p) for p in plans), str(self.device))
        with self._lock:
            hit = self._batches.get(key)
        if hit is not None and all(a is b for a, b in zip(hit.plans, plans)):
            return hit
        offsets = [0]
        for p in plans:
            offsets.append(offsets[-1] + p.graph.n_nodes)
        groups: OrderedDict[tuple, list] = OrderedDict()
        for gi, p in enumerate(plans):
            for t in p.targets:
                groups.setdefault(t.key, []).append((gi, t))
        dev = self.device
        batch = GraphBatch(
            plans=plans,
            offsets=offsets,
            op_index=torch.cat([p.op_index for p in plans]).to(dev),
            shape_index=torch.cat([p.shape_index for p in plans]).to(dev),
            groups={
                k: (torch.tensor([offsets[gi] + t.node for gi, t in v], device=dev), v)
                for k, v in groups.items()
            },
        )
        batch.prepared = self.prepare(batch)
        with self._lock:
            self._batches.put(key, batch)
        return batch

    def node_embeddings(self, batch: GraphBatch) -> torch.Tensor:
        """``(N, hid)`` final node embeddings of a batch (after the last LayerNorm, if any)."""
        x = self.op_embed(batch.op_index) + self.shape_enc(batch.shape_index)  # (N, hid)
        x = self.propagate(x, batch)
        return self.ln(x) if self.config.layernorm else x

    def _decode(self, key: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
        """Decode ``(k, hid)`` embeddings that share a decoder key (see ``predict.decoder_key``)."""
        n = x.shape[0]
        if len(key) == 4:
            return self.decoder(x, key)  # (k, o, i, h, w)
        if len(key) == 3:
            return self.decoder_1d(x).view(n, -1, 1, 1)
        if key[1] > 0:
            return self.decoder(x, (key[0], key[1], 1, 1), class_pred=True)  # (k, num_classes, i)
        w = self.decoder_1d(x).view(n, 2, -1)  # (k, 2, max_ch): norm weight row, bias row
        return self.bias_class(w) if key[1] < 0 else w

    # ---- public API -------------------------------------------------------------------------------------
    def predict(
        self,
        models: nn.Module | Sequence[nn.Module],
        predict_class_layers: bool = True,
        graph: ComputationGraph | Sequence[ComputationGraph] | None = None,
        keep_grads: bool = False,
        generator: torch.Generator | None = None,
        complete: bool = False,
        fill: FillConfig | None = None,
        autocast: str | torch.dtype | None = None,
    ) -> Prediction | list[Prediction]:
        """Predict the parameters of one model (or a list, in one batched forward) and write them in place.

        Args:
            models: an ``nn.Module`` or a list of them.
            predict_class_layers: also predict the classifier (last layer), tiled to its size even when
                its number of classes differs from ``num_classes``; False leaves it as it is (fine-tuning
                on another task) and lists it in ``skipped``.
            graph: the model's graph (or one per model); built and cached when None.
            keep_grads: write the predictions as non-leaf tensors that keep the autograd graph back to
                the GHN (to train the GHN through the models' loss); otherwise values are copied into
                the existing parameters without gradients.
            generator: random generator for the one random value GHNs add (a vision transformer's class
                token row); None uses torch's default generator, as the original code does.
            complete: also give a value to the tensors the graph has no node for (layer scales, relative
                position bias tables, class tokens, ...) by the rules of :mod:`ghnviz.hyper.extras`; they
                are listed in ``Prediction.filled``, not in ``predicted``. Tensors no rule covers stay in
                ``skipped``. False (the default) predicts exactly what the original GHN code predicts.
            fill: settings of those rules (implies ``complete=True``); default :class:`FillConfig`.
            autocast: ``'bf16'``, ``'fp16'`` (or a dtype): run the GHN's graph network under
                ``torch.autocast`` on its device; the decoders always run in float32. None: float32.

        Returns:
            A :class:`Prediction` (a list of them for a list of models).
        """
        single = isinstance(models, nn.Module)
        models = [models] if single else list(models)
        t0 = time.perf_counter()
        if graph is None:
            graphs = [self.graph_for(m) for m in models]
        else:
            graphs = [graph] if isinstance(graph, ComputationGraph) else list(graph)
        if len(graphs) != len(models):
            raise ValueError(f'got {len(graphs)} graphs for {len(models)} models')
        t1 = time.perf_counter()
        with torch.set_grad_enabled(keep_grads and torch.is_grad_enabled()), self._autocast(autocast):
            batch = self.make_batch(graphs, models)
            results = self._write(batch, models, predict_class_layers, keep_grads, generator)
        t2 = time.perf_counter()
        filled: list[dict[str, str]] = [{} for _ in models]
        complete = complete or fill is not None
        if complete:
            for gi, (model, (_, skip)) in enumerate(zip(models, results)):
                no_node = [n for n in skip if n in batch.plans[gi].unmatched]
                filled[gi] = fill_missing(model, no_node, fill)
                for n in filled[gi]:
                    skip.pop(n)
        t3 = time.perf_counter()
        seconds = {'graph': t1 - t0, 'predict': t2 - t1, 'total': t3 - t0}
        if complete:
            seconds['fill'] = t3 - t2
        out = [
            Prediction(model=m, predicted=pred, skipped=skip, seconds=dict(seconds), graph=g, filled=f)
            for m, g, (pred, skip), f in zip(models, graphs, results, filled)
        ]
        return out[0] if single else out

    def _autocast(self, autocast: str | torch.dtype | None) -> contextlib.AbstractContextManager:
        if autocast is None:
            return contextlib.nullcontext()
        dtype = AUTOCAST_DTYPES.get(autocast) if isinstance(autocast, str) else autocast
        if not isinstance(dtype, torch.dtype):
            raise ValueError(
                f'autocast={autocast!r}: expected None, a torch dtype or one of {sorted(AUTOCAST_DTYPES)}'
            )
        return torch.autocast(self.device.type, dtype=dtype)

    def predict_differentiable(
        self,
        models: nn.Module | Sequence[nn.Module],
        graph: ComputationGraph | Sequence[ComputationGraph] | None = None,
        predict_class_layers: bool = True,
    ) -> Prediction | list[Prediction]:
        """``predict(..., keep_grads=True)``: a loss on the models' outputs backpropagates into the GHN."""
        return self.predict(models, predict_class_layers=predict_class_layers, graph=graph, keep_grads=True)

    @torch.no_grad()
    def embed(
        self,
        models: nn.Module | Sequence[nn.Module],
        graph: ComputationGraph | Sequence[ComputationGraph] | None = None,
    ) -> GraphEmbedding | list[GraphEmbedding]:
        """Node embeddings of a model's graph after propagation, and their mean (the graph embedding)."""
        single = isinstance(models, nn.Module)
        models = [models] if single else list(models)
        if graph is None:
            graphs = [self.graph_for(m) for m in models]
        else:
            graphs = [graph] if isinstance(graph, ComputationGraph) else list(graph)
        batch = self.make_batch(graphs, models)
        x = self.node_embeddings(batch)  # (N, hid)
        out = []
        for gi, g in enumerate(graphs):
            nodes = x[batch.offsets[gi] : batch.offsets[gi + 1]]
            out.append(GraphEmbedding(vector=nodes.mean(0), nodes=nodes, graph=g))
        return out[0] if single else out

    def _write(
        self,
        batch: GraphBatch,
        models: list[nn.Module],
        predict_class_layers: bool,
        keep_grads: bool,
        generator: torch.Generator | None,
    ) -> list[tuple[list[str], dict[str, str]]]:
        x = self.node_embeddings(batch)  # (N, hid)
        predicted: list[set[str]] = [set() for _ in models]
        skipped: list[dict[str, str]] = [dict(p.unmatched) for p in batch.plans]
        weight_norm = self.config.weight_norm
        for key, (idx, members) in batch.groups.items():
            if members[0][1].is_cls and not predict_class_layers:
                for gi, t in members:
                    for name, *_ in t.writes:
                        skipped[gi][name] = 'classifier layer, not predicted (predict_class_layers=False)'
                continue
            with torch.autocast(x.device.type, enabled=False):  # decoders run in float32
                w = self._decode(key, x.index_select(0, idx).float())
            for j, (gi, t) in enumerate(members):
                model = models[gi]
                for name, shape, row, is_w in t.writes:
                    block = crop_block(w[j] if row is None else w[j, row], shape, self.centred, generator)
                    norm = normalizer(shape, is_w) if weight_norm else None
                    if norm is not None:
                        block = norm(block)
                    problem = _assign(models[gi], name, block, shape, self.centred, keep_grads)
                    if problem is None:
                        predicted[gi].add(name)
                        skipped[gi].pop(name, None)
                    else:
                        skipped[gi][name] = problem
        results = []
        for gi, model in enumerate(models):
            names = [n for n, _ in model.named_parameters()]
            results.append(
                (
                    [n for n in names if n in predicted[gi]],
                    {n: skipped[gi][n] for n in names if n in skipped[gi]},
                )
            )
        return results


def _assign(
    model: nn.Module, name: str, block: torch.Tensor, shape: tuple[int, ...], centred: bool, keep_grads: bool
) -> str | None:
    """Tile ``block`` to ``shape`` and write it as parameter ``name``; returns a reason when it cannot."""
    path, _, attr = name.rpartition('.')
    module = model.get_submodule(path) if path else model
    current = module._parameters.get(attr)
    if current is None:
        return f'{type(module).__name__}.{attr} is not a parameter tensor'
    if tuple(shape) != tuple(current.shape):
        return (
            f'graph says shape {tuple(shape)}, the model has {tuple(current.shape)} (graph of another model?)'
        )
    if not keep_grads and current.device == block.device and tile_into(current.data, block):
        return None
    value = tile_block(block, shape, centred)
    if tuple(value.shape) != tuple(current.shape):
        return f'the decoded block {tuple(block.shape)} cannot be fitted to {tuple(current.shape)}'
    if keep_grads:
        module._parameters[attr] = value.to(current.device, current.dtype)
    else:
        with torch.no_grad():
            current.copy_(value)
    return None


def __getattr__(name: str) -> Any:
    # GHN2 lives in ghnviz.hyper.ghn2 (which imports this module); it is also reachable from here.
    if name == 'GHN2':
        from ghnviz.hyper.ghn2 import GHN2

        return GHN2
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
