"""Random DeepNets-1M architectures: the generator's distribution, driven by an explicit numpy Generator.

One call of :func:`sample_arch` draws candidate architectures until one passes the rejection rules:

* cells ``U{min_cells..max_cells}``; a "deep" threshold drawn from ``deep_thresholds``; steps per cell
  ``U{min_steps..max_steps}``, or ``U{min_steps..medium_steps}`` when the net is deeper than the threshold;
* genotype: per cell type, ``1e-3 * N(0, 1)`` scores over the 15 ops, softmax, then each node keeps the
  two inputs whose best op scores highest, each with its best op (``none`` only when steps > 1);
  with p=0.5 the reduction cell may only use none/pool/skip; with p=0.5 (steps > 1) each intermediate
  node except the last is dropped from the concatenation with p=0.5;
* rejected: a ``cse`` without any conv, two ``cse`` or two dense (5x5, 7x7) convs in one cell type,
  no op with parameters, more than ``max_params`` parameters at C=32 on CIFAR or ImageNet inputs, and
  networks whose output is cut off by ``none`` edges;
* stem kernel {3, 5, 7}; ``C_mult`` {1, 2}; ``preproc`` forced when steps > 1 or C_mult > 1, else on
  for convolutional nets and with p=0.2 for transformer-style ones; global pooling forced for
  transformer-style and deep nets, else p=0.9; no norm with p=0.5 for nets with at most
  ``min_cells + 1`` cells and at most ``medium_steps`` steps; stem type {0, 1}, stem max-pool p=0.5
  (type 0); 1 or 2 classifier layers;
* width: ``C`` from {32, 48, ..., 128} and ``fc_dim`` from {64, ..., 512}, narrowed for larger
  networks (see :func:`sample_width`).

A genotype filter (``accept_genotype``) lets callers partition the genotype space between splits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .genotypes import OP_VOCABULARY, Genotype, count_ops
from .structure import count_params, output_is_live

WIDTHS = tuple(range(32, 129, 16))  # candidate C: 32, 48, ..., 128
FC_DIMS = tuple(range(64, 513, 64))  # candidate classifier hidden widths: 64, ..., 512
BASE_C = 32  # width at which the parameter limit is checked
BASE_FC_DIM = 256  # classifier hidden width used for that check
_DENSE_CONVS = ('conv_5x5', 'conv_7x7')
_POOL_ONLY_LIMIT = OP_VOCABULARY.index('sep_conv_3x3')  # ops before it: none, pools, skip
_NONE = OP_VOCABULARY.index('none')
_MAX_ATTEMPTS = 100_000


@dataclass(frozen=True)
class SpaceConfig:
    """Parameters of the generator's distribution (defaults: the train/val/test distribution)."""

    min_cells: int = 4  # fewest cells
    max_cells: int = 18  # most cells
    deep_thresholds: tuple[int, ...] = (7, 8, 9, 10)  # nets with more cells than this are "deep"
    min_steps: int = 1  # fewest intermediate nodes per cell
    medium_steps: int = 2  # most nodes per cell in deep nets (and the bn-free limit)
    max_steps: int = 4  # most nodes per cell otherwise
    max_params: int = 10**7  # parameter limit at C=32
    bn_free: bool = False  # every network without normalisation


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _parse_cell(weights: np.ndarray, steps: int, allow_none: bool) -> tuple[tuple[str, int], ...]:
    """Pick two inputs per node (highest best-op score first) and the best op of each."""
    usable = weights.copy()
    if not allow_none:
        usable[:, _NONE] = -np.inf
    edges, start = [], 0
    for i in range(steps):
        rows = usable[start : start + i + 2]  # (i + 2, n_ops): one row per candidate input
        order = np.argsort(-rows.max(axis=1), kind='stable')[:2]
        edges += [(OP_VOCABULARY[int(np.argmax(rows[j]))], int(j)) for j in order]
        start += i + 2
    return tuple(edges)


def sample_genotype(
    rng: np.random.Generator, steps: int, only_pool: bool, drop_concat: bool, allow_none: bool
) -> Genotype:
    """Draw one genotype with ``steps`` nodes per cell (all ops allowed, including ``msa``)."""
    n_edges = sum(i + 2 for i in range(steps))
    alphas_normal = 1e-3 * rng.standard_normal((n_edges, len(OP_VOCABULARY)))
    alphas_reduce = 1e-3 * rng.standard_normal((n_edges, len(OP_VOCABULARY)))
    if only_pool:
        alphas_reduce[:, _POOL_ONLY_LIMIT:] = -1000.0
    normal = _parse_cell(_softmax(alphas_normal), steps, allow_none)
    reduce = _parse_cell(_softmax(alphas_reduce), steps, allow_none)
    if drop_concat:
        concat = tuple(i for i in range(2, steps + 2) if i == steps + 1 or rng.random() > 0.5)
    else:
        concat = tuple(range(2, steps + 2))
    return Genotype(normal=normal, normal_concat=concat, reduce=reduce, reduce_concat=concat)


def _rejected(genotype: Genotype) -> bool:
    has_cse = count_ops(genotype, ('cse',)) > 0
    has_msa = count_ops(genotype, ('msa',)) > 0
    has_conv = any('conv' in op for op, _ in genotype.normal + genotype.reduce)
    two_cse = count_ops(genotype, ('cse',), 'normal') > 1 or count_ops(genotype, ('cse',), 'reduce') > 1
    two_dense = (
        count_ops(genotype, _DENSE_CONVS, 'normal') > 1 or count_ops(genotype, _DENSE_CONVS, 'reduce') > 1
    )
    no_params = not (has_cse or has_msa or has_conv)
    return (has_cse and not has_conv) or two_cse or two_dense or no_params


def sample_width(
    rng: np.random.Generator, n_cells: int, glob_avg: bool, genotype: Genotype, params_c32: int
) -> tuple[int, int]:
    """Draw ``(C, fc_dim)``: wide choices only for small, shallow, globally pooled networks.

    ``params_c32`` is the network's parameter count at C=32 on CIFAR inputs (10 classes).
    """
    millions = params_c32 / 1e6
    fc_dim = FC_DIMS[rng.integers(4)]  # 64-256
    if millions > 0.8 or not glob_avg or count_ops(genotype, _DENSE_CONVS) > 0 or n_cells > 12:
        C = WIDTHS[0]
    elif millions > 0.4 or n_cells > 10:
        C = WIDTHS[rng.integers(2)]  # 32-48
    elif millions > 0.2 or n_cells > 8:
        C = WIDTHS[rng.integers(3)]  # 32-64
    else:
        C = WIDTHS[rng.integers(len(WIDTHS))]  # 32-128
        if C <= 64:
            fc_dim = FC_DIMS[rng.integers(len(FC_DIMS))]
    return int(C), int(fc_dim)


def sample_arch(
    rng: np.random.Generator,
    config: SpaceConfig = SpaceConfig(),
    accept_genotype: Callable[[Genotype], bool] | None = None,
) -> dict:
    """Draw one architecture; returns the ``Network`` keyword arguments plus ``params_c32``."""
    for _ in range(_MAX_ATTEMPTS):
        n_cells = int(rng.integers(config.min_cells, config.max_cells + 1))
        deep = int(rng.choice(config.deep_thresholds))
        top_steps = config.max_steps if n_cells <= deep else config.medium_steps
        steps = int(rng.integers(config.min_steps, top_steps + 1))
        only_pool = bool(rng.random() > 0.5)
        drop_concat = bool(rng.random() > 0.5) if steps > 1 else False
        genotype = sample_genotype(rng, steps, only_pool, drop_concat, allow_none=steps > 1)
        ks = int(rng.choice([3, 5, 7]))
        if _rejected(genotype) or (accept_genotype is not None and not accept_genotype(genotype)):
            continue

        is_vit = count_ops(genotype, ('msa',)) > 0
        C_mult = int(rng.choice([1, 2]))
        preproc = True if (steps > 1 or C_mult > 1) else bool(not is_vit or rng.random() > 0.8)
        glob_avg = bool(is_vit or n_cells > deep or rng.random() > 0.1)
        if config.bn_free:
            norm = None
        elif n_cells <= config.min_cells + 1 and steps <= config.medium_steps:
            norm = 'bnorm' if rng.integers(2) == 0 else None
        else:
            norm = 'bnorm'
        stem_type = int(rng.integers(2))
        stem_pool = bool(stem_type == 0 and rng.random() > 0.5)
        fc_layers = int(rng.integers(1, 3))
        args = dict(
            genotype=genotype,
            n_cells=n_cells,
            ks=ks,
            stem_type=stem_type,
            stem_pool=stem_pool,
            norm=norm,
            preproc=preproc,
            C_mult=C_mult,
            fc_layers=fc_layers,
            glob_avg=glob_avg,
        )
        counts = [
            count_params(C=BASE_C, fc_dim=BASE_FC_DIM, num_classes=10, is_imagenet_input=imagenet, **args)
            for imagenet in (False, True)
        ]
        if max(counts) > config.max_params or not output_is_live(genotype, n_cells):
            continue
        C, fc_dim = sample_width(rng, n_cells, glob_avg, genotype, counts[0])
        return {**args, 'C': C, 'fc_dim': fc_dim, 'params_c32': counts[0]}
    raise RuntimeError(f'no architecture accepted in {_MAX_ATTEMPTS} attempts; check the config and filter')
