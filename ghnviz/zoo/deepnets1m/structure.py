"""Facts about a DeepNets-1M network computed from its arguments alone, without building modules.

:func:`count_params` mirrors the construction in :mod:`.net` (tested against real networks); it takes
microseconds where building even a shape-only network takes tens of milliseconds, which keeps
architecture sampling (that rejects oversized networks) fast.
"""

from __future__ import annotations

from collections.abc import Callable

from .genotypes import Genotype, normalize_genotype
from .ops import parse_op_name


def _norm(norm: str | None, channels: int) -> int:
    return 2 * channels if norm not in (None, '', 'none') else 0  # affine weight and bias


def _relu_conv_bn(C_in: int, C_out: int, ks: int, norm: str | None) -> int:
    return C_in * C_out * ks * ks + _norm(norm, C_out)


def _factorized_reduce(C_in: int, C_out: int, norm: str | None) -> int:
    return 2 * C_in * (C_out // 2) + _norm(norm, C_out)


def _msa(C_in: int, C_out: int) -> int:
    inner = (C_in // 8) * 8  # 8 heads
    attention = C_in * inner * 3 + inner * C_out + C_out
    layer_norms = 4 * C_in
    feed_forward = C_in * C_out + C_out + C_out * C_in + C_in
    return attention + layer_norms + feed_forward


def _cse(C: int) -> int:
    hidden = C // 2
    return C * hidden + hidden + hidden * C + C


# op kind -> (C_in, C_out, kernel size, stride, norm) -> number of parameters
_OP_PARAMS: dict[str, Callable[[int, int, int, int, str | None], int]] = {
    'none': lambda i, o, k, s, n: 0,
    'max_pool': lambda i, o, k, s, n: 0,
    'avg_pool': lambda i, o, k, s, n: 0,
    'skip_connect': lambda i, o, k, s, n: 0 if s == 1 else _factorized_reduce(i, o, n),
    'conv': lambda i, o, k, s, n: _relu_conv_bn(i, o, k, n),
    'conv2': lambda i, o, k, s, n: i * i * k + i * o * k + _norm(n, o),
    'sep_conv': lambda i, o, k, s, n: 2 * i * k * k + i * i + i * o + _norm(n, i) + _norm(n, o),
    'dil_conv': lambda i, o, k, s, n: i * k * k + i * o + _norm(n, o),
    'msa': lambda i, o, k, s, n: _msa(i, o),
    'cse': lambda i, o, k, s, n: _cse(i),
}


def _cell_params(edges, C_in, C_out, reduction, is_vit, norm) -> int:
    total = 0
    for op_name, index in edges:
        kind, ks = parse_op_name(op_name)
        stride = 2 if (reduction and index < 2 and not is_vit) else 1
        total += _OP_PARAMS[kind](C_in if index <= 1 else C_out, C_out, ks, stride, norm)
    return total


def count_params(
    genotype: Genotype,
    C: int,
    n_cells: int,
    num_classes: int = 10,
    ks: int = 3,
    is_imagenet_input: bool = True,
    stem_pool: bool = False,
    stem_type: int = 0,
    is_vit: bool | None = None,
    norm: str | None = 'bn-track',
    preproc: bool = True,
    C_mult: int = 2,
    fc_layers: int = 0,
    fc_dim: int = 0,
    glob_avg: bool = True,
) -> int:
    """Number of parameters of ``Network(...)`` with these arguments (no auxiliary head)."""
    genotype = normalize_genotype(genotype)
    if is_vit is None:
        is_vit = any(op == 'msa' for op, _ in genotype.normal + genotype.reduce)
    steps = len(genotype.normal_concat)

    C_prev_prev = C_prev = C_curr = C
    if is_vit:
        patch, side = (16, 14) if is_imagenet_input else (3, 11)
        total = 3 * C * patch * patch + C * side * side
    elif stem_type == 0:
        C_stem = C * (3 if (preproc and not is_imagenet_input) else 1)
        total = 3 * C_stem * ks * ks + _norm(norm, C_stem)
        C_prev_prev = C_prev = C_stem
    else:
        half = C // 2
        total = (
            3 * half * ks * ks
            + _norm(norm, half)
            + half * C * 9
            + _norm(norm, C)
            + C * C * 9
            + _norm(norm, C)
        )

    reductions = {n_cells // 3, 2 * n_cells // 3} - {0}
    reduction_prev = stem_type == 1
    for cell_ind in range(n_cells):
        reduction = cell_ind in reductions
        if reduction:
            C_curr *= C_mult
        widen_out = (cell_ind + 1) in reductions and steps == 1 and not preproc
        C_in = C_curr if preproc else C_prev
        C_out = C_curr * (C_mult if widen_out else 1)
        if preproc:
            if reduction_prev and not is_vit:
                total += _factorized_reduce(C_prev_prev, C_out, norm)
            else:
                total += _relu_conv_bn(C_prev_prev, C_out, 1, norm)
            total += _relu_conv_bn(C_prev, C_out, 1, norm)
        edges = genotype.reduce if reduction else genotype.normal
        concat = genotype.reduce_concat if reduction else genotype.normal_concat
        total += _cell_params(edges, C_in, C_out, reduction, is_vit, norm)
        reduction_prev = reduction
        C_prev_prev, C_prev = C_prev, len(concat) * C_curr

    if not glob_avg:
        downsampled = stem_type == 1 or stem_pool
        side = (7 if downsampled else 14) if is_imagenet_input else (4 if downsampled else 8)
        C_prev *= side**2
    widths = [C_prev] + [fc_dim] * max(fc_layers - 1, 0) + [num_classes]
    total += sum(w_in * w_out + w_out for w_in, w_out in zip(widths[:-1], widths[1:]))
    return total


def _cell_output_live(edges, concat, s0: bool, s1: bool) -> bool:
    states = [s0, s1]
    for i in range(len(edges) // 2):
        live = False
        for op_name, index in edges[2 * i : 2 * i + 2]:
            live = live or (op_name != 'none' and states[index])
        states.append(live)
    return any(states[i] for i in concat)


def output_is_live(genotype: Genotype, n_cells: int) -> bool:
    """False if ``none`` edges cut every path to the last cell's output (the network cannot run)."""
    genotype = normalize_genotype(genotype)
    reductions = {n_cells // 3, 2 * n_cells // 3} - {0}
    s0 = s1 = True  # every stem produces both cell inputs
    for cell_ind in range(n_cells):
        reduction = cell_ind in reductions
        edges = genotype.reduce if reduction else genotype.normal
        concat = genotype.reduce_concat if reduction else genotype.normal_concat
        s0, s1 = s1, _cell_output_live(edges, concat, s0, s1)
    return s1
