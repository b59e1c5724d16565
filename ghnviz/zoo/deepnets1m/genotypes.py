"""Cell genotypes of the DeepNets-1M space: the data type, the op vocabulary and named genotypes.

A genotype describes one normal cell and one reduction cell. Each cell has ``steps`` intermediate
nodes; node ``i`` sums two edges ``(op_name, input_index)``, where inputs 0 and 1 are the two cell
inputs and ``j >= 2`` is intermediate node ``j - 2``. The cell output concatenates the nodes listed
in ``*_concat`` (indices counted the same way).
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Genotype(NamedTuple):
    """A pair of cells: ``normal``/``reduce`` edge lists and the node indices each concatenates."""

    normal: tuple[tuple[str, int], ...]  # two (op, input index) edges per intermediate node
    normal_concat: tuple[int, ...]  # nodes concatenated into the normal cell's output
    reduce: tuple[tuple[str, int], ...]  # same for the reduction cell
    reduce_concat: tuple[int, ...]


# The 15 candidate ops of the DeepNets-1M generator, in the order it indexes them.
OP_VOCABULARY: tuple[str, ...] = (
    'none',
    'max_pool_3x3',
    'avg_pool_3x3',
    'skip_connect',
    'sep_conv_3x3',
    'sep_conv_5x5',
    'dil_conv_3x3',
    'dil_conv_5x5',
    'conv_1x1',
    'conv_7x1_1x7',
    'conv_3x3',
    'conv_5x5',
    'conv_7x7',
    'msa',
    'cse',
)

DARTS = Genotype(
    normal=[
        ('sep_conv_3x3', 0),
        ('sep_conv_3x3', 1),
        ('sep_conv_3x3', 0),
        ('sep_conv_3x3', 1),
        ('sep_conv_3x3', 1),
        ('skip_connect', 0),
        ('skip_connect', 0),
        ('dil_conv_3x3', 2),
    ],
    normal_concat=[2, 3, 4, 5],
    reduce=[
        ('max_pool_3x3', 0),
        ('max_pool_3x3', 1),
        ('skip_connect', 2),
        ('max_pool_3x3', 1),
        ('max_pool_3x3', 0),
        ('skip_connect', 2),
        ('skip_connect', 2),
        ('max_pool_3x3', 1),
    ],
    reduce_concat=[2, 3, 4, 5],
)

PDARTS = Genotype(
    normal=[
        ('skip_connect', 0),
        ('dil_conv_3x3', 1),
        ('skip_connect', 0),
        ('sep_conv_3x3', 1),
        ('sep_conv_3x3', 1),
        ('sep_conv_3x3', 3),
        ('sep_conv_3x3', 0),
        ('dil_conv_5x5', 4),
    ],
    normal_concat=[2, 3, 4, 5],
    reduce=[
        ('avg_pool_3x3', 0),
        ('sep_conv_5x5', 1),
        ('sep_conv_3x3', 0),
        ('dil_conv_5x5', 2),
        ('max_pool_3x3', 0),
        ('dil_conv_3x3', 1),
        ('dil_conv_3x3', 1),
        ('dil_conv_5x5', 3),
    ],
    reduce_concat=[2, 3, 4, 5],
)

# A transformer-like genotype: one self-attention layer per normal cell, 3x3 average pooling per
# reduction cell; the DeepNets-1M "predefined" ViT stacks 12 such cells with C=128.
ViT = Genotype(
    normal=[('none', 0), ('msa', 1)],
    normal_concat=[2],
    reduce=[('none', 0), ('avg_pool_3x3', 1)],
    reduce_concat=[2],
)


def genotype_to_dict(genotype: Genotype) -> dict[str, Any]:
    """JSON-friendly dict of a genotype (edges as ``[op, index]`` lists)."""
    return {
        'normal': [[op, int(i)] for op, i in genotype.normal],
        'normal_concat': [int(i) for i in genotype.normal_concat],
        'reduce': [[op, int(i)] for op, i in genotype.reduce],
        'reduce_concat': [int(i) for i in genotype.reduce_concat],
    }


def genotype_from_dict(d: dict[str, Any]) -> Genotype:
    """Inverse of :func:`genotype_to_dict`; also accepts the DeepNets-1M meta-file layout."""
    return Genotype(
        normal=tuple((str(op), int(i)) for op, i in d['normal']),
        normal_concat=tuple(int(i) for i in d['normal_concat']),
        reduce=tuple((str(op), int(i)) for op, i in d['reduce']),
        reduce_concat=tuple(int(i) for i in d['reduce_concat']),
    )


def normalize_genotype(genotype: Any) -> Genotype:
    """The same genotype as hashable tuples; accepts any 4-field genotype (lists, ranges) or a dict."""
    if isinstance(genotype, dict):
        return genotype_from_dict(genotype)
    normal, normal_concat, reduce, reduce_concat = genotype
    d = {'normal': normal, 'normal_concat': normal_concat, 'reduce': reduce, 'reduce_concat': reduce_concat}
    return genotype_from_dict(d)


def count_ops(genotype: Genotype, names: tuple[str, ...], cells: str = 'both') -> int:
    """Number of edges whose op is in ``names`` in the normal, reduce or both cells."""
    edges = {'normal': genotype.normal, 'reduce': genotype.reduce, 'both': genotype.normal + genotype.reduce}
    return sum(op in names for op, _ in edges[cells])


# name -> genotype, resolved by ``create_model('deepnets1m:<name>')``
GENOTYPES: dict[str, Genotype] = {
    name: normalize_genotype(g) for name, g in {'DARTS': DARTS, 'PDARTS': PDARTS, 'ViT': ViT}.items()
}
DARTS, PDARTS, ViT = GENOTYPES['DARTS'], GENOTYPES['PDARTS'], GENOTYPES['ViT']
