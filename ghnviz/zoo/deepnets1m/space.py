"""The DeepNets-1M splits as reproducible, serialisable architecture specs.

Names look like ``'test/5'``: architecture 5 of the ``test`` split. Every architecture is drawn by its
own generator, ``numpy.random.default_rng(SeedSequence([split seed, index]))``, so index ``i`` needs
no other index and gives the same network on every machine (numpy's PCG64 stream and its normal and
integer samplers are stable across platforms).

Splits never share a genotype: a genotype belongs to the bucket ``sha256(canonical JSON) mod 100``;
``train`` keeps buckets 10-99, ``val`` 0-4, and the held-out families (``test``, ``wide``, ``deep``,
``dense``, ``bnfree``) 5-9. Conditioning on a hash bucket leaves the distribution of every other
property unchanged.

| split | size | distribution |
|---|---|---|
| train | 1,000,000 | the DeepNets-1M generator (4-18 cells, 1-4 steps, <= 1e7 params at C=32) |
| val, test | 500 each | same generator |
| wide | 100 | test-style nets, C x4 on CIFAR-size inputs, x2 on ImageNet-size inputs |
| deep | 100 | 10-36 cells, deep threshold 18, <= 1e8 params |
| dense | 100 | 2-10 steps (<= 6 when deep), <= 1e8 params |
| bnfree | 100 | no normalisation layers |
| predefined | 2 | 0 = torchvision ResNet-50, 1 = the ViT genotype (C=128, 12 cells, no preproc, C_mult=1) |
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch.nn as nn

from .genotypes import GENOTYPES, Genotype, genotype_from_dict, genotype_to_dict, normalize_genotype
from .ops import parse_op_name
from .sampler import SpaceConfig, sample_arch, sample_width
from .structure import count_params

N_BUCKETS = 100  # genotype-hash buckets shared out between splits


@dataclass(frozen=True)
class SplitInfo:
    """One split: its generator settings, seed, size and genotype buckets."""

    seed: int  # first entropy word of every architecture's SeedSequence
    size: int  # valid indices are 0..size-1
    buckets: tuple[int, int]  # genotype-hash buckets [lo, hi) this split may use
    config: SpaceConfig = SpaceConfig()  # the generator's distribution
    width_mult: tuple[int, int] = (1, 1)  # C multiplier on (CIFAR-size, ImageNet-size) inputs


_HELD_OUT = (5, 10)
SPLITS: dict[str, SplitInfo] = {
    'train': SplitInfo(seed=61_001, size=1_000_000, buckets=(10, N_BUCKETS)),
    'val': SplitInfo(seed=61_002, size=500, buckets=(0, 5)),
    'test': SplitInfo(seed=61_003, size=500, buckets=_HELD_OUT),
    'wide': SplitInfo(seed=61_004, size=100, buckets=_HELD_OUT, width_mult=(4, 2)),
    'deep': SplitInfo(
        seed=61_005,
        size=100,
        buckets=_HELD_OUT,
        config=SpaceConfig(min_cells=10, max_cells=36, deep_thresholds=(18,), max_params=10**8),
    ),
    'dense': SplitInfo(
        seed=61_006,
        size=100,
        buckets=_HELD_OUT,
        config=SpaceConfig(min_steps=2, medium_steps=6, max_steps=10, max_params=10**8),
    ),
    'bnfree': SplitInfo(seed=61_007, size=100, buckets=_HELD_OUT, config=SpaceConfig(bn_free=True)),
}
PREDEFINED_SIZE = 2
SPLIT_NAMES: tuple[str, ...] = (*SPLITS, 'predefined')


def genotype_bucket(genotype: Genotype) -> int:
    """Stable hash bucket of a genotype, in ``range(N_BUCKETS)``."""
    text = json.dumps(genotype_to_dict(normalize_genotype(genotype)), separators=(',', ':'))
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) % N_BUCKETS


@dataclass(frozen=True)
class ArchSpec:
    """A DeepNets-1M architecture (or a named torchvision model) as plain, JSON-serialisable data.

    ``create_model(spec, num_classes=..., is_imagenet_input=...)`` builds it.
    """

    genotype: Genotype | None  # None for a torchvision model
    n_cells: int = 0  # number of cells
    C: int = 32  # width on CIFAR-size (32x32) inputs
    C_imagenet: int | None = None  # width on ImageNet-size inputs if it differs from C (wide split)
    ks: int = 3  # stem kernel size
    stem_type: int = 0  # 0 simple, 1 two-part DARTS ImageNet stem
    stem_pool: bool = False  # max-pool after the simple stem
    norm: str | None = 'bnorm'  # 'bnorm' = BatchNorm on batch statistics, 'bn-track', or None
    preproc: bool = True  # 1x1 conv preprocessing of cell inputs
    C_mult: int = 2  # width multiplier at reductions
    fc_layers: int = 1  # classifier depth
    fc_dim: int = 256  # classifier hidden width
    glob_avg: bool = True  # global average pooling before the classifier
    torchvision: str | None = None  # a torchvision model name instead of a genotype
    name: str | None = None  # where it came from, e.g. 'test/5'
    params_c32: int | None = None  # parameters at C=32, CIFAR inputs, 10 classes (the sampler's size measure)

    def __post_init__(self):
        if self.genotype is not None:
            object.__setattr__(self, 'genotype', normalize_genotype(self.genotype))
        if (self.genotype is None) == (self.torchvision is None):
            raise ValueError('an ArchSpec needs exactly one of genotype and torchvision')

    def width(self, is_imagenet_input: bool) -> int:
        """``C`` for the given input size."""
        return self.C_imagenet if (is_imagenet_input and self.C_imagenet is not None) else self.C

    def network_kwargs(self, is_imagenet_input: bool = True) -> dict[str, Any]:
        """Keyword arguments of :class:`~.net.Network` (without ``num_classes``)."""
        if self.genotype is None:
            raise ValueError(f'{self.torchvision} is a torchvision model, not a DeepNets-1M network')
        keys = ('genotype', 'n_cells', 'ks', 'stem_type', 'stem_pool', 'norm', 'preproc', 'C_mult')
        kwargs = {k: getattr(self, k) for k in keys}
        kwargs.update(fc_layers=self.fc_layers, fc_dim=self.fc_dim, glob_avg=self.glob_avg)
        kwargs.update(C=self.width(is_imagenet_input), is_imagenet_input=is_imagenet_input)
        return kwargs

    def build(self, num_classes: int = 1000, is_imagenet_input: bool = True, **overrides: Any) -> nn.Module:
        """The network; ``overrides`` replace :class:`~.net.Network` arguments (e.g. ``light=True``)."""
        if self.torchvision is not None:
            from ..adapt import adapt_to_small_images
            from ..factory import torchvision_model

            model = torchvision_model(self.torchvision, num_classes=num_classes, **overrides)
            return model if is_imagenet_input else adapt_to_small_images(model)
        from .net import Network

        return Network(num_classes=num_classes, **{**self.network_kwargs(is_imagenet_input), **overrides})

    def resample_width(self, rng: np.random.Generator) -> ArchSpec:
        """A copy with ``C`` and ``fc_dim`` drawn again by the width rule (the same draw the split made).

        DeepNets-1M training redraws the width of a training architecture every time it is loaded;
        calling this per use with the trainer's own generator reproduces that.
        """
        if self.genotype is None or self.params_c32 is None or self.C_imagenet is not None:
            raise ValueError(
                'only sampled architectures of fixed width (not wide or predefined) have a width rule'
            )
        C, fc_dim = sample_width(rng, self.n_cells, self.glob_avg, self.genotype, self.params_c32)
        return dataclasses.replace(self, C=C, fc_dim=fc_dim)

    def num_params(self, num_classes: int = 10, is_imagenet_input: bool = False) -> int:
        """Parameter count of the built network (counted without building it, for genotypes)."""
        if self.genotype is None:
            return sum(p.numel() for p in self.build(num_classes, is_imagenet_input).parameters())
        return count_params(num_classes=num_classes, **self.network_kwargs(is_imagenet_input))

    def describe(self) -> str:
        """One line for display, e.g. ``'14 cells x 2 steps, C=48, conv+msa, bn'``."""
        if self.genotype is None:
            return f'torchvision {self.torchvision}'
        edges = self.genotype.normal + self.genotype.reduce
        kinds = sorted({parse_op_name(op)[0] for op, _ in edges} - {'none', 'skip_connect'})
        steps = len(self.genotype.normal) // 2
        width = f'C={self.C}' + (f'/{self.C_imagenet}' if self.C_imagenet is not None else '')
        norm = 'bn' if self.norm else 'no norm'
        head = ('' if self.glob_avg else ', flatten') + (
            f', {self.fc_layers} fc' if self.fc_layers > 1 else ''
        )
        return f'{self.n_cells} cells x {steps} steps, {width}, {"+".join(kinds) or "no ops"}, {norm}{head}'

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d['genotype'] = None if self.genotype is None else genotype_to_dict(self.genotype)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchSpec:
        d = dict(d)
        if d.get('genotype') is not None:
            d['genotype'] = genotype_from_dict(d['genotype'])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(',', ':'))

    @classmethod
    def from_json(cls, text: str) -> ArchSpec:
        return cls.from_dict(json.loads(text))


def _predefined(index: int) -> ArchSpec:
    if index == 0:
        return ArchSpec(genotype=None, torchvision='resnet50', name='predefined/0')
    vit = dict(genotype=GENOTYPES['ViT'], n_cells=12, C=128, preproc=False, C_mult=1, fc_layers=0, fc_dim=0)
    return ArchSpec(**vit, norm='bn-track', name='predefined/1')


@lru_cache(maxsize=4096)
def sample_architecture(split: str, index: int) -> ArchSpec:
    """Architecture ``index`` of ``split`` (see the module docstring for the scheme)."""
    size = PREDEFINED_SIZE if split == 'predefined' else SPLITS[split].size if split in SPLITS else None
    if size is None:
        raise ValueError(f'unknown DeepNets-1M split {split!r}; valid splits: {", ".join(SPLIT_NAMES)}')
    if not 0 <= index < size:
        raise ValueError(f'split {split!r} has {size} architectures; index {index} is out of range')
    if split == 'predefined':
        return _predefined(index)
    info = SPLITS[split]
    rng = np.random.default_rng(np.random.SeedSequence([info.seed, index]))
    lo, hi = info.buckets
    args = sample_arch(rng, info.config, accept_genotype=lambda g: lo <= genotype_bucket(g) < hi)
    cifar_mult, imagenet_mult = info.width_mult
    C = args.pop('C')
    C_imagenet = C * imagenet_mult if imagenet_mult != cifar_mult else None
    return ArchSpec(**args, C=C * cifar_mult, C_imagenet=C_imagenet, name=f'{split}/{index}')


def sample_architectures(split: str, n: int, start: int = 0) -> list[ArchSpec]:
    """Architectures ``start .. start + n - 1`` of ``split``."""
    return [sample_architecture(split, i) for i in range(start, start + n)]
