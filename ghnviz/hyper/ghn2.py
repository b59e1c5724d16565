"""GHN-2 (and GHN-1): node embeddings propagated by a gated graph network (:mod:`ghnviz.hyper.gatedgnn`).

Decoding, tiling and writing are the shared ones of :class:`~ghnviz.hyper.ghn.GHN`, with GHN-2's rules:
top-left decoder windows, 1x1 decoder layers stored as convolution weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ghnviz.hyper.config import GHNConfig
from ghnviz.hyper.gatedgnn import GatedGNN, build_sweep_plan
from ghnviz.hyper.ghn import GHN, GraphBatch, register_ghn
from ghnviz.hyper.layers import MLP


@register_ghn('ghn2')
class GHN2(GHN):
    """GHN-2 (and GHN-1): gated graph network with forward/backward sweeps; top-left decoder windows."""

    def build_gnn(self) -> nn.Module:
        c = self.config
        if c.hypernet == 'gatedgnn':
            return GatedGNN(c.hid, ve=c.ve)
        if c.hypernet == 'mlp':
            return MLP(c.hid, (c.hid, c.hid))
        raise ValueError(f"hypernet {c.hypernet!r} is not supported; known: ['gatedgnn', 'mlp']")

    def prepare(self, batch: GraphBatch) -> Any:
        if self.config.hypernet != 'gatedgnn':
            return None
        return build_sweep_plan([p.graph.adj for p in batch.plans], self.config.ve).to(self.device)

    def propagate(self, x: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
        if batch.prepared is None:
            return self.gnn(x)
        return self.gnn(x, batch.prepared)

    @classmethod
    def recognises(cls, state_dict: dict[str, torch.Tensor]) -> bool:
        return 'gnn.gru.weight_ih' in state_dict or 'gnn.fc.0.weight' in state_dict

    @classmethod
    def config_from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> GHNConfig:
        """Config of a GHN-2 state dict stored without one (read from tensor names and shapes).

        ``hid`` from ``embed.weight``, ``num_classes`` from the classifier head, ``max_shape`` from
        ``decoder.conv.2.weight`` (``sqrt`` of its rows) and the spatial table size (9 rows = 11, else 16),
        ``ve``/``layernorm``/``hypernet`` from which tensors exist; ``weight_norm`` cannot be seen in the
        tensors and is taken as True (every published GHN-2 uses it).
        """
        try:
            num_classes = state_dict['decoder.class_layer_predictor.1.weight'].shape[0]
            hid = state_dict['embed.weight'].shape[-1]
            m = int(round(state_dict['decoder.conv.2.weight'].shape[0] ** 0.5))
            s = 11 if state_dict['shape_enc.embed_spatial.weight'].shape[0] == 9 else 16
        except KeyError as e:
            raise ValueError(f'not a GHN-2 state dict: missing {e.args[0]}') from None
        return GHNConfig(
            max_shape=(m, m, s, s),
            num_classes=num_classes,
            hid=hid,
            hypernet='gatedgnn' if 'gnn.gru.weight_ih' in state_dict else 'mlp',
            weight_norm=True,
            ve='gnn.mlp_ve.fc.0.weight' in state_dict,
            layernorm='ln.weight' in state_dict,
        )

    @classmethod
    def adapt_state_dict(
        cls, state_dict: dict[str, torch.Tensor], config: GHNConfig
    ) -> dict[str, torch.Tensor]:
        """Decoder 1x1 weights stored as linear ``(out, in)`` matrices become ``(out, in, 1, 1)``."""
        out = dict(state_dict)
        for k, v in state_dict.items():
            if (
                k.startswith('decoder.')
                and not k.startswith('decoder.fc.')
                and k.endswith('.weight')
                and v.dim() == 2
            ):
                out[k] = v[:, :, None, None]
        return out
