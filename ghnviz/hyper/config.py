"""Configuration of a graph hypernetwork.

A :class:`GHNConfig` holds everything needed to rebuild a GHN's modules; checkpoints store it and
:func:`ghnviz.hyper.io.load_ghn` reads it back. Architectures with more settings subclass it and
add fields (the registry in :mod:`ghnviz.hyper.ghn` maps an ``arch`` name to a module class and its
config class).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

log = logging.getLogger(__name__)


@dataclass
class GHNConfig:
    """Settings of a GHN-2 style hypernetwork (the published GHN-2 values are the defaults).

    The field names are those of the constructor arguments stored in published GHN-2 checkpoints,
    so such a ``config`` dict maps onto this class one to one.
    """

    # Largest (out, in, h, w) the convolutional decoder emits; larger tensors are tiled. (64, 64, 11, 11)
    # is the CIFAR-10 GHN-2 value, ImageNet uses (64, 64, 16, 16).
    max_shape: tuple[int, int, int, int] = (64, 64, 11, 11)
    # Number of classes of the training task: sizes the classifier heads of the decoder.
    num_classes: int = 10
    # Width of node embeddings; 32 in every published GHN-2.
    hid: int = 32
    # Graph network that propagates node embeddings ('gatedgnn' = GHN-1/2, 'mlp' = no message passing).
    hypernet: str = 'gatedgnn'
    # Parameter decoder; only the convolutional decoder of GHN-2 is implemented.
    decoder: str = 'conv'
    # Rescale predicted tensors (fan-in for weights, squashing for norms and biases), as GHN-2 does.
    weight_norm: bool = True
    # Use virtual edges (shortest-path messages, up to 50 hops) in message passing: the GHN-2 setting.
    ve: bool = True
    # LayerNorm on the final node embeddings: the GHN-2 setting.
    layernorm: bool = True

    # Keys a stored config must carry (the original constructor has no default for them).
    STORED_REQUIRED: ClassVar[tuple[str, ...]] = ('max_shape', 'num_classes')
    # Values the original GHN constructor uses when a stored config omits a key (GHN-1 behaviour).
    ABSENT_DEFAULTS: ClassVar[dict[str, Any]] = {
        'hypernet': 'gatedgnn',
        'decoder': 'conv',
        'weight_norm': False,
        've': False,
        'layernorm': False,
        'hid': 32,
    }

    def __post_init__(self) -> None:
        self.max_shape = tuple(int(s) for s in self.max_shape)  # JSON gives lists
        if len(self.max_shape) != 4 or self.max_shape[2] != self.max_shape[3]:
            raise ValueError(f'max_shape must be (out, in, s, s), got {self.max_shape}')

    @property
    def ve_cutoff(self) -> int:
        """Longest virtual edge the graphs fed to this GHN should carry (1 = none)."""
        return 50 if self.ve else 1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict of the fields."""
        d = dataclasses.asdict(self)
        d['max_shape'] = list(self.max_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], fill_absent: bool = False) -> GHNConfig:
        """Build a config from a dict, ignoring (and logging) unknown keys.

        Args:
            d: field values.
            fill_absent: take :attr:`ABSENT_DEFAULTS` for missing keys instead of this class's defaults
                (right for configs written by the original GHN training code).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            log.debug('ignoring config keys %s', unknown)
        values = {k: v for k, v in d.items() if k in names}
        if fill_absent:
            for k, v in cls.ABSENT_DEFAULTS.items():
                values.setdefault(k, v)
            missing = [k for k in cls.STORED_REQUIRED if k not in values]
            if missing:
                raise ValueError(f'stored config lacks {missing}')
        return cls(**values)
