"""GHN-3: the graph hypernetwork with a Graphormer in place of GHN-2's gated graph network.

Everything except node propagation is shared with GHN-2 (:class:`~ghnviz.hyper.ghn.GHN`): the
primitive and shape embeddings, the decoders and their state-dict names, the prediction path. What
GHN-3 changes there is selected by class flags and small overrides:

* ``gnn`` is a :class:`~ghnviz.hyper.graphormer.Graphormer` over dense, padded graphs;
* the decoder's 1x1 layers are stored as linear weights (``conv_layout = False``);
* kernels are cut from the centre of the decoder's ``S x S`` map, larger kernels are upsampled
  bilinearly, and the classifier reads the centre tap (``centred = True``, see
  :class:`~ghnviz.hyper.decoder.ConvDecoder` and :func:`~ghnviz.hyper.predict.fit_tensor`);
* the decoders always run in float32, also under autocast.

Published GHN-3 files (``joblib`` dumps of a bare state dict) carry no config: :func:`infer_config`
reads it from the tensor names and shapes. Training checkpoints (``state_dict``, ``config``, ``args``,
``optimizer``, ``epoch``, ``step``) carry one and load through the safe reader of
:mod:`ghnviz.hyper.safe_pickle` (``argparse.Namespace`` is the only extra class it accepts).

The published names (``'ghn3tm8'``, ...) are registered with :func:`ghnviz.hyper.io.load_ghn` here;
:mod:`ghnviz.hyper.hub` finds or downloads the files.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ghnviz.hyper import hub
from ghnviz.hyper.config import GHNConfig
from ghnviz.hyper.ghn import GHN, GraphBatch, register_ghn
from ghnviz.hyper.graphormer import DenseGraphs, Graphormer

log = logging.getLogger(__name__)

# Top-level names some GHN-3 files use for the structural embeddings that live in the first block.
_STRUCTURE_EMBEDDINGS = ('centrality_embed_in', 'centrality_embed_out', 'input_dist_embed')
# Rows of ``shape_enc.embed_spatial`` -> decoder spatial size S (the kernel-size table depends on S).
_SPATIAL_ROWS_TO_S = {9: 11, 11: 16}
_LAYER_KEY = re.compile(r'^gnn\.(\d+)\.ln1\.weight$')


@dataclass
class GHN3Config(GHNConfig):
    """Settings of a GHN-3 (defaults: the published ``ghn3tm8``)."""

    # (out, in, S, S): GHN-3 uses (hid, hid, 16, 16) on ImageNet, 64 channels for the T model.
    max_shape: tuple[int, int, int, int] = (64, 64, 16, 16)
    # ImageNet classes: every published GHN-3 was trained on ImageNet.
    num_classes: int = 1000
    # Node embedding width: 64 for GHN-3-T.
    hid: int = 64
    # Kept for stored configs of the training code; a GHN-3 always propagates with its Graphormer.
    hypernet: str = 'graphormer'
    # Attention heads: the published rule is 16 when hid > 64, else 8.
    heads: int = 8
    # Graphormer blocks: 3 for GHN-3-T.
    layers: int = 3
    # The file holds a GHN-2 trained with the GHN-3 code (gated graph network); loaded as 'ghn2' instead.
    is_ghn2: bool = False

    # Values the GHN-3 training code used when a stored config omits a key.
    ABSENT_DEFAULTS: ClassVar[dict[str, Any]] = {
        'decoder': 'conv',
        'weight_norm': True,
        've': True,
        'layernorm': True,
        'heads': 8,
        'layers': 3,
        'is_ghn2': False,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.is_ghn2:
            self.hypernet = 'graphormer'  # training configs store the GatedGNN default, which GHN-3 ignores


def infer_config(state_dict: dict[str, torch.Tensor]) -> GHN3Config:
    """The config of a GHN-3 state dict stored without one, read from its tensor names and shapes.

    This is the one place such files are recognised:

    * ``hid``: width of ``embed.weight``;
    * ``num_classes``: rows of ``decoder.class_layer_predictor.1.weight``;
    * ``max_shape``: ``(m, m, S, S)`` with ``m = sqrt(rows of decoder.conv.2.weight)`` and ``S`` from the
      rows of ``shape_enc.embed_spatial.weight`` (9 rows: 11, 11 rows: 16);
    * ``layers``: number of ``gnn.<i>.ln1.weight`` tensors;
    * ``heads``: 16 if ``hid > 64`` else 8 (the heads are not visible in the shapes);
    * ``is_ghn2``: any ``gnn.gru.`` tensor (a GHN-2 saved by the GHN-3 code);
    * ``layernorm``: ``ln.weight`` is present; ``weight_norm`` and ``ve`` are True (every published file).

    Raises:
        ValueError: a tensor the rules need is missing or has an unexpected shape.
    """
    try:
        hid = int(state_dict['embed.weight'].shape[-1])
        num_classes = int(state_dict['decoder.class_layer_predictor.1.weight'].shape[0])
        m = round(state_dict['decoder.conv.2.weight'].shape[0] ** 0.5)
        spatial_rows = int(state_dict['shape_enc.embed_spatial.weight'].shape[0])
    except KeyError as e:
        raise ValueError(f'not a GHN-3 state dict: missing {e.args[0]}') from None
    if m * m != state_dict['decoder.conv.2.weight'].shape[0]:
        raise ValueError(
            f'decoder.conv.2.weight has {state_dict["decoder.conv.2.weight"].shape[0]} rows, not m*m'
        )
    s = _SPATIAL_ROWS_TO_S.get(spatial_rows)
    if s is None:
        log.warning('shape_enc.embed_spatial has %d rows; assuming a 16x16 decoder map', spatial_rows)
        s = 16
    is_ghn2 = any(k.startswith('gnn.gru.') for k in state_dict)
    layers = sum(1 for k in state_dict if _LAYER_KEY.match(k))
    return GHN3Config(
        max_shape=(m, m, s, s),
        num_classes=num_classes,
        hid=hid,
        hypernet='gatedgnn' if is_ghn2 else 'graphormer',
        weight_norm=True,
        ve=True,
        layernorm='ln.weight' in state_dict,
        heads=16 if hid > 64 else 8,
        layers=layers,
        is_ghn2=is_ghn2,
    )


@register_ghn('ghn3')
class GHN3(GHN):
    """GHN-3: Graphormer propagation, centred decoder windows, decoders in float32.

    Built from a :class:`GHN3Config` (or its fields as keyword arguments). A freshly built GHN-3 gets the
    published initialisation: every embedding table drawn from a normal distribution with std
    ``width ** -0.5`` truncated at +-2, and the last layer of each decoder scaled down 5x with zero bias.
    """

    config_class: ClassVar[type[GHNConfig]] = GHN3Config
    centred: ClassVar[bool] = True
    conv_layout: ClassVar[bool] = False

    def __init__(self, config: GHN3Config | None = None, **kwargs: Any):
        config = config if config is not None else GHN3Config(**kwargs)
        if config.is_ghn2:
            raise ValueError(
                'this config describes a GHN-2 (is_ghn2=True); build it as the "ghn2" architecture'
            )
        super().__init__(config)
        self._init_weights()

    def _init_weights(self) -> None:
        for layer in (self.decoder_1d.fc[-2], self.decoder.conv[-2], self.decoder.class_layer_predictor[-1]):
            with torch.no_grad():
                layer.weight.div_(5.0)
                layer.bias.zero_()
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=module.weight.shape[1] ** -0.5)

    def build_gnn(self) -> nn.Module:
        c = self.config
        return Graphormer(c.hid, c.heads, c.layers)

    def prepare(self, batch: GraphBatch) -> DenseGraphs:
        return DenseGraphs.from_adjacency([p.graph.adj for p in batch.plans], self.device)

    def propagate(self, x: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
        graphs: DenseGraphs = batch.prepared
        return graphs.to_flat(self.gnn(graphs.to_dense(x), graphs))  # (N, hid)

    def _decode(self, key: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super()._decode(key, x.float())

    @classmethod
    def recognises(cls, state_dict: dict[str, torch.Tensor]) -> bool:
        return 'gnn.0.ln1.weight' in state_dict and not any(k.startswith('gnn.gru.') for k in state_dict)

    @classmethod
    def config_from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> GHNConfig:
        return infer_config(state_dict)

    @classmethod
    def adapt_state_dict(
        cls, state_dict: dict[str, torch.Tensor], config: GHNConfig
    ) -> dict[str, torch.Tensor]:
        """Move top-level structural embeddings into block 0; 1x1 conv decoder weights become matrices."""
        out = {}
        for k, v in state_dict.items():
            if k.split('.', 1)[0] in _STRUCTURE_EMBEDDINGS:
                k = 'gnn.0.' + k
            elif k.startswith('decoder.') and v.dim() == 4 and v.shape[2:] == (1, 1):
                v = v.flatten(1)
            out[k] = v
        return out


def _register_named_checkpoints() -> None:
    from ghnviz.hyper.io import register_named_checkpoint

    for name, ck in hub.OFFICIAL.items():
        resolve = functools.partial(hub.resolve, name)
        register_named_checkpoint(name, resolve)
        register_named_checkpoint(ck.filename, resolve)


_register_named_checkpoints()
