"""``create_model`` and ``list_models``: one place that turns a model name into an ``nn.Module``.

Names:

* any torchvision classification model, e.g. ``'resnet18'`` (also ``'torchvision:resnet18'``), built
  with random weights: nothing is ever downloaded;
* ``'deepnets1m:<GENOTYPE>'``, e.g. ``'deepnets1m:DARTS'``: the DeepNets-1M network template with a
  named genotype (:data:`~.deepnets1m.genotypes.GENOTYPES`); keyword arguments go to
  :class:`~.deepnets1m.net.Network` (``C``, ``n_cells``, ``is_imagenet_input``, ...);
* ``'deepnets1m:<split>/<index>'``, e.g. ``'deepnets1m:test/5'``: an architecture of a DeepNets-1M
  split (:mod:`.deepnets1m.space`);
* an :class:`~.deepnets1m.space.ArchSpec` instance.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from typing import Any

import torch.nn as nn

from .deepnets1m.genotypes import GENOTYPES
from .deepnets1m.space import PREDEFINED_SIZE, SPLIT_NAMES, SPLITS, ArchSpec, sample_architecture

DEEPNETS_PREFIX = 'deepnets1m:'
TORCHVISION_PREFIX = 'torchvision:'
SOURCES = ('torchvision', 'deepnets1m')

# Defaults for named genotypes where the caller gives none, keyed by (name, ImageNet input): the
# published DARTS widths and depths (CIFAR: C=36, 20 cells; ImageNet: C=48, 14 cells) and the
# DeepNets-1M ViT (C=128, 12 cells, no preprocessing, no widening). Every other argument keeps the
# Network default (in particular stem_type=0 also on ImageNet inputs).
_NAMED_DEFAULTS: dict[tuple[str, bool], dict[str, Any]] = {
    ('DARTS', False): dict(C=36, n_cells=20),
    ('DARTS', True): dict(C=48, n_cells=14),
    ('PDARTS', False): dict(C=36, n_cells=20),
    ('PDARTS', True): dict(C=48, n_cells=14),
    ('ViT', False): dict(C=128, n_cells=12, preproc=False, C_mult=1),
    ('ViT', True): dict(C=128, n_cells=12, preproc=False, C_mult=1),
}


@lru_cache(maxsize=1)
def torchvision_names() -> tuple[str, ...]:
    """Names of torchvision's classification models."""
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def torchvision_model(name: str, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """A torchvision classifier with random weights (``weights`` are never loaded)."""
    import torchvision

    if kwargs.get('weights') is not None or kwargs.get('pretrained'):
        raise ValueError('create_model never downloads weights: pass weights=None (the default)')
    kwargs.pop('weights', None)
    kwargs.pop('pretrained', None)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def _named_genotype(name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    from .deepnets1m.net import Network

    is_imagenet_input = kwargs.pop('is_imagenet_input', True)
    args = {**_NAMED_DEFAULTS[(name, is_imagenet_input)], **kwargs}
    return Network(
        num_classes=num_classes, genotype=GENOTYPES[name], is_imagenet_input=is_imagenet_input, **args
    )


def _parse_split_name(rest: str) -> tuple[str, int] | None:
    split, sep, index = rest.partition('/')
    if not sep or split not in SPLIT_NAMES or not index.isdigit():
        return None
    return split, int(index)


def _unknown(name: str) -> ValueError:
    candidates = list_models() + [f'{DEEPNETS_PREFIX}{s}/0' for s in SPLIT_NAMES]
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f' Close matches: {", ".join(close)}.' if close else ''
    return ValueError(
        f'unknown model {name!r}. Valid names: a torchvision classifier name (list_models("torchvision")), '
        f'"{DEEPNETS_PREFIX}<genotype>" with genotype in {sorted(GENOTYPES)}, or '
        f'"{DEEPNETS_PREFIX}<split>/<index>" with split in {list(SPLIT_NAMES)}.{hint}'
    )


def _resolve_name(name: str) -> tuple[str, Any]:
    """``('genotype', name)``, ``('split', (split, index))`` or ``('torchvision', name)``; ValueError else."""
    if name.startswith(DEEPNETS_PREFIX):
        rest = name[len(DEEPNETS_PREFIX) :]
        if rest in GENOTYPES:
            return 'genotype', rest
        parsed = _parse_split_name(rest)
        if parsed is not None:
            return 'split', parsed
    elif name.removeprefix(TORCHVISION_PREFIX) in torchvision_names():
        return 'torchvision', name.removeprefix(TORCHVISION_PREFIX)
    raise _unknown(name)


def check_model_name(name: str) -> None:
    """Raise the ``ValueError`` :func:`create_model` would raise for an unknown name, building nothing."""
    _resolve_name(name)


def create_model(name: str | ArchSpec, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """Build a model by name, with freshly initialised (random) parameters.

    Args:
        name: a model name (see the module docstring) or an :class:`ArchSpec`.
        num_classes: classifier outputs.
        **kwargs: passed to the constructor: torchvision's model function, or
            :class:`~.deepnets1m.net.Network` (``is_imagenet_input`` defaults to True, as there; for
            torchvision models of a split, ``is_imagenet_input=False`` adapts them to 32x32 inputs).

    Raises:
        ValueError: unknown name, with the valid prefixes and close matches.
    """
    if isinstance(name, ArchSpec):
        return name.build(num_classes=num_classes, **kwargs)
    if not isinstance(name, str):
        raise TypeError(f'expected a model name or an ArchSpec, got {type(name).__name__}')
    kind, resolved = _resolve_name(name)
    if kind == 'genotype':
        return _named_genotype(resolved, num_classes, dict(kwargs))
    if kind == 'split':
        return sample_architecture(*resolved).build(num_classes=num_classes, **kwargs)
    return torchvision_model(resolved, num_classes=num_classes, **kwargs)


def list_models(source: str | None = None) -> list[str]:
    """Model names ``create_model`` accepts.

    Args:
        source: None (torchvision names, named genotypes and the predefined architectures),
            ``'torchvision'``, ``'deepnets1m'`` (named genotypes and predefined architectures), or
            ``'deepnets1m:<split>'`` for every name of one split.
    """
    deepnets = [f'{DEEPNETS_PREFIX}{g}' for g in GENOTYPES]
    deepnets += [f'{DEEPNETS_PREFIX}predefined/{i}' for i in range(PREDEFINED_SIZE)]
    if source is None:
        return list(torchvision_names()) + deepnets
    if source == 'torchvision':
        return list(torchvision_names())
    if source == 'deepnets1m':
        return deepnets
    split = source[len(DEEPNETS_PREFIX) :] if source.startswith(DEEPNETS_PREFIX) else None
    if split == 'predefined':
        return deepnets[len(GENOTYPES) :]
    if split in SPLITS:
        return [f'{DEEPNETS_PREFIX}{split}/{i}' for i in range(SPLITS[split].size)]
    raise ValueError(f'unknown source {source!r}; valid: None, {", ".join(SOURCES)}, "deepnets1m:<split>"')
