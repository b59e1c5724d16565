"""Weight statistics: one row per parameter tensor, computed in batches of same-shape tensors.

Per tensor: mean, std (unbiased), min, max, L2 norm, share of near-zero values and the count of
non-finite values. For parameters with two or more dimensions, viewed as the ``(out, rest)`` matrix
``M = w.reshape(out, -1)``:

* singular values: ``sv_max``, ``sv_min`` (the ``min(out, rest)``-th), condition number
  ``cond = sv_max / sv_min`` (``inf`` when ``sv_min`` is below the numerical floor, see
  :data:`SV_FLOOR`), and the effective rank of Roy & Vetterli ("The effective rank: a measure of
  effective dimensionality", EUSIPCO 2007): ``exp(H(p))`` with ``p_i = s_i / sum_j s_j`` and
  ``H`` the Shannon entropy (natural log, ``0 log 0 = 0``). It lies between 1 and ``min(out, rest)``.
* ``diversity``: mean absolute Pearson correlation between distinct output filters (rows of ``M``),
  the off-diagonal mean of ``|corrcoef(M)|``. Low values mean diverse filters; the tiled weights a
  GHN predicts for wide layers repeat filters and push it towards 1 ("lack of diversity" in
  "Pretraining a Neural Network before Knowing Its Architecture", arXiv:2207.10049). Rows with
  zero variance are left out. When ``out > max_rows`` (default 1024) the mean is taken over a
  fixed random subset of ``max_rows`` rows (seeded), an unbiased estimate of the full mean.

Singular values come from the eigenvalues of the smaller Gram matrix ``M M^T`` or ``M^T M``
(float32 first, float64 for ill-conditioned matrices; several times faster than ``svdvals``, within
about 2e-5 relative of a float64 SVD); ``sv_method='svdvals'`` uses ``torch.linalg.svdvals`` on the
batch instead.

``init_*`` columns repeat the figures for the layer's standard PyTorch initialisation: a deep copy of
each module that owns the tensor is re-initialised with its ``reset_parameters()`` under a fixed
seed (the global CPU RNG is forked and restored, the model is not touched); identical layers share
one draw (see :func:`reference_init_tensors`). Parameters of modules without
``reset_parameters`` (ConvNeXt's ``layer_scale``, ViT's class token, ...) get NaN there.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

log = logging.getLogger(__name__)

NEAR_ZERO_REL = 1e-3  # |x| < NEAR_ZERO_REL * max|x| counts as near zero
SV_FLOOR = 64 * torch.finfo(torch.float64).eps  # sigma^2 <= SV_FLOOR * k * sigma_max^2 is treated as 0
REFINE_BELOW = 1e-2  # 'gram': redo in float64 when sigma_min^2 < REFINE_BELOW * sigma_max^2 (cond > 10)
ELEMENT_COLUMNS = ('mean', 'std', 'min', 'max', 'norm', 'near_zero', 'n_nonfinite')
MATRIX_COLUMNS = ('sv_max', 'sv_min', 'eff_rank', 'cond', 'diversity')
STAT_COLUMNS = ELEMENT_COLUMNS + MATRIX_COLUMNS


def _eig_to_sv(ev: torch.Tensor, n: int) -> torch.Tensor:
    """Gram eigenvalues (B, m) of matrices with n columns -> singular values, numerical zeros set to 0."""
    floor = ev[:, -1:].clamp_min(0) * SV_FLOOR * n  # (B, 1)
    return torch.where(ev > floor, ev, torch.zeros_like(ev)).sqrt()


def _sv_from_gram(gram: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """Singular values (ascending, float64) of ``mats`` (B, m, n), m <= n, given ``gram = mats mats^T``.

    A float32 pass serves matrices with ``sigma_min^2 >= REFINE_BELOW * sigma_max^2``, where its
    relative error stays near 1e-5 (at most 2e-5 against a float64 SVD over the layers of ResNet-50
    and ConvNeXt-T); the others are recomputed with a float64 Gram matrix and float64 eigenvalues,
    which resolve condition numbers up to about 1e7.
    """
    ev = torch.linalg.eigvalsh(gram).double()  # (B, m), ascending
    redo = ev[:, 0] < REFINE_BELOW * ev[:, -1]  # (B,)
    if redo.any():
        m64 = mats[redo].double()  # (B', m, n)
        ev[redo] = torch.linalg.eigvalsh(m64 @ m64.transpose(1, 2))  # (B', m)
    return _eig_to_sv(ev, mats.shape[2])


def _sv_gram(mats: torch.Tensor) -> torch.Tensor:
    """Singular values (ascending, float64) of a batch ``(B, m, n)`` with m <= n, via the Gram matrix."""
    return _sv_from_gram(mats @ mats.transpose(1, 2), mats)


def _sv_svdvals(mats: torch.Tensor) -> torch.Tensor:
    """Singular values (ascending, float64) of a batch ``(B, m, n)`` with ``torch.linalg.svdvals``."""
    return torch.linalg.svdvals(mats).flip(-1).double()  # (B, m)


SV_METHODS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {'gram': _sv_gram, 'svdvals': _sv_svdvals}


def _element_stats(flat: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-row statistics of a batch of flattened float32 tensors ``(B, numel)``."""
    n = flat.shape[1]
    if n > 1:
        std, mean = torch.std_mean(flat, dim=1)  # (B,), (B,)
    else:
        std, mean = torch.full_like(flat[:, 0], float('nan')), flat[:, 0]
    lo, hi = torch.aminmax(flat, dim=1)  # (B,), (B,)
    absmax = torch.maximum(lo.abs(), hi.abs()).unsqueeze(1)  # (B, 1)
    near = torch.count_nonzero(flat.abs() < NEAR_ZERO_REL * absmax, dim=1)  # (B,)
    mean64, std64 = mean.double(), std.double()
    # |x|^2 = (n - 1) std^2 + n mean^2: both terms are non-negative, so no cancellation
    sq = (n - 1) * std64.nan_to_num(0.0).square() + n * mean64.square()  # (B,)
    nonfinite = torch.zeros(flat.shape[0], dtype=torch.int64)
    bad = ~torch.isfinite(mean)  # a NaN or inf anywhere makes the mean non-finite
    if bad.any():
        nonfinite[bad] = (~torch.isfinite(flat[bad])).sum(dim=1)
    return {
        'mean': mean64.numpy(),
        'std': std64.numpy(),
        'min': lo.double().numpy(),
        'max': hi.double().numpy(),
        'norm': sq.sqrt().numpy(),
        'near_zero': (near.double() / n).numpy(),
        'n_nonfinite': nonfinite.numpy(),
    }


def _mean_abs_offdiag(cov: torch.Tensor, ok: torch.Tensor) -> np.ndarray:
    """Mean |correlation| over distinct valid rows, from centred Gram matrices ``cov`` (B, n, n).

    Args:
        cov: ``Zc Zc^T`` for row-centred matrices ``Zc``.
        ok: (B, n) rows whose variance is real (not rounding noise of a constant row).
    """
    d = torch.diagonal(cov, dim1=1, dim2=2).clamp_min(0).sqrt()  # (B, n) row norms
    inv = torch.where(ok, 1 / d.clamp_min(1e-30), torch.zeros_like(d))  # (B, n); invalid rows -> 0
    corr = (cov * inv.unsqueeze(2) * inv.unsqueeze(1)).abs_()  # (B, n, n)
    n_ok = ok.sum(dim=1).double()  # (B,)
    n_pairs = n_ok * (n_ok - 1)  # ordered off-diagonal pairs of valid rows
    total = corr.sum(dim=(1, 2), dtype=torch.float64) - torch.diagonal(corr, dim1=1, dim2=2).sum(1).double()
    return torch.where(n_pairs > 0, total / n_pairs.clamp_min(1), float('nan')).numpy()


def _centre(mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row means (B, n, 1), centred rows (B, n, k) and the mask of rows with real variance (B, n)."""
    mu = mats.mean(dim=2, keepdim=True)  # (B, n, 1)
    zc = mats - mu  # (B, n, k)
    # a constant row leaves rounding residue of about eps * |mean| per entry: not variance
    ok = zc.norm(dim=2) > 1e-5 * mu[:, :, 0].abs() * math.sqrt(mats.shape[2])  # (B, n)
    return mu, zc, ok & (zc.abs().amax(dim=2) > 0)


def _diversity(mats: torch.Tensor, max_rows: int, gen: torch.Generator) -> np.ndarray:
    """Mean off-diagonal |corrcoef| between the rows of each matrix in a batch ``(B, out, rest)``."""
    if mats.shape[1] > max_rows:
        rows = torch.randperm(mats.shape[1], generator=gen)[:max_rows].sort().values
        mats = mats[:, rows]  # (B, max_rows, rest)
    _, zc, ok = _centre(mats)
    return _mean_abs_offdiag(torch.bmm(zc, zc.transpose(1, 2)), ok)  # via (B, out, out)


def _matrix_stats(
    mats: torch.Tensor, sv_method: str, max_rows: int, gen: torch.Generator
) -> dict[str, np.ndarray]:
    """Singular-value summary and diversity for a batch of finite matrices ``(B, out, rest)``."""
    _, out, rest = mats.shape
    if sv_method == 'gram' and out <= rest and out <= max_rows:
        # one centred Gram serves both: M M^T = Zc Zc^T + rest * mu mu^T (a sum of non-negative terms)
        mu, zc, ok = _centre(mats)
        cov = torch.bmm(zc, zc.transpose(1, 2))  # (B, out, out)
        diversity = _mean_abs_offdiag(cov, ok)
        s = _sv_from_gram(cov + rest * (mu @ mu.transpose(1, 2)), mats)  # (B, out) ascending
    else:
        small = mats if out <= rest else mats.transpose(1, 2)  # (B, k, K), k <= K
        s = SV_METHODS[sv_method](small)  # (B, k) ascending, float64
        diversity = _diversity(mats, max_rows, gen)
    total = s.sum(dim=1, keepdim=True)  # (B, 1)
    p = s / total  # (B, k)
    ent = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim=1)  # (B,)
    sv_max, sv_min = s[:, -1], s[:, 0]
    cond = torch.where(sv_min > 0, sv_max / sv_min.clamp_min(1e-300), torch.full_like(sv_max, math.inf))
    cond = torch.where(sv_max > 0, cond, torch.full_like(cond, float('nan')))
    return {
        'sv_max': sv_max.numpy(),
        'sv_min': sv_min.numpy(),
        'eff_rank': torch.where(total[:, 0] > 0, ent.exp(), float('nan')).numpy(),
        'cond': cond.numpy(),
        'diversity': diversity,
    }


def tensor_stats(
    tensors: list[torch.Tensor], sv_method: str = 'gram', max_rows: int = 1024, seed: int = 0
) -> pd.DataFrame:
    """The :data:`STAT_COLUMNS` for a list of tensors, one row each, batched by shape.

    Args:
        tensors: parameter tensors (any device and floating dtype; computed in float32 on the CPU).
        sv_method: 'gram' or 'svdvals' (see the module docstring).
        max_rows: row cap for the diversity measure.
        seed: seed of the row subsample used when a matrix has more than ``max_rows`` rows.

    Returns:
        A DataFrame with the stat columns and one row per tensor, in input order.
    """
    if sv_method not in SV_METHODS:
        raise ValueError(f'unknown sv_method {sv_method!r}; valid: {sorted(SV_METHODS)}')
    gen = torch.Generator().manual_seed(seed)
    out = np.full((len(tensors), len(STAT_COLUMNS)), np.nan)  # filled column by column, one frame at the end
    col = {c: j for j, c in enumerate(STAT_COLUMNS)}
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(tuple(t.shape), []).append(i)
    for shape, idx in groups.items():
        if math.prod(shape) == 0:
            continue
        parts = [tensors[i].detach().to('cpu', torch.float32) for i in idx]
        stack = parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts)  # (B, *shape)
        elem = _element_stats(stack.reshape(len(idx), -1))  # over (B, numel)
        for c, vals in elem.items():
            out[idx, col[c]] = vals
        if len(shape) < 2:
            continue
        good = [j for j in range(len(idx)) if elem['n_nonfinite'][j] == 0]  # SVD needs finite values
        if not good:
            continue
        mats = stack[good].reshape(len(good), shape[0], -1)  # (B', out, rest)
        rows = [idx[j] for j in good]
        for c, vals in _matrix_stats(mats, sv_method, max_rows, gen).items():
            out[rows, col[c]] = vals
    frame = pd.DataFrame(out, columns=list(STAT_COLUMNS))
    frame['n_nonfinite'] = frame['n_nonfinite'].fillna(0).astype('int64')
    return frame


def _module_key(module: nn.Module) -> tuple:
    """Identifies modules whose standard initialisation draws from the same distribution."""
    shapes = tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters())
    return type(module), module.extra_repr(), shapes


def reference_init_tensors(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Parameters of each module after its own ``reset_parameters()``, on deep copies (CPU).

    One fresh copy is drawn per distinct module configuration (class, ``extra_repr()`` and
    parameter shapes); identical layers (the repeated blocks of a ResNet stage, say) share that
    draw. The global CPU RNG is forked and restored around the re-initialisation, so neither the
    model nor the caller's random state changes. Modules are visited in ``named_modules()`` order.

    Returns:
        ``{parameter name: freshly initialised tensor}`` for modules that have ``reset_parameters``.
        Tensors of identical layers are the same objects.
    """
    out: dict[str, torch.Tensor] = {}
    drawn: dict[tuple, nn.Module] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for mod_name, module in model.named_modules():
            own = [n for n, _ in module.named_parameters(recurse=False)]
            if not own or not callable(getattr(module, 'reset_parameters', None)):
                continue
            key = _module_key(module)
            fresh = drawn.get(key)
            if fresh is None:
                fresh = drawn[key] = copy.deepcopy(module).to('cpu')
                with torch.no_grad():
                    fresh.reset_parameters()
            for pname in own:
                out[f'{mod_name}.{pname}' if mod_name else pname] = getattr(fresh, pname)
    return out


def weight_stats(
    model: nn.Module,
    reference_init: bool = True,
    sv_method: str = 'gram',
    max_rows: int = 1024,
    seed: int = 0,
) -> pd.DataFrame:
    """Statistics of every parameter tensor of a model (see the module docstring for the columns).

    Args:
        model: any ``nn.Module``; it is not modified.
        reference_init: add ``init_<stat>`` columns for the standard initialisation of each layer.
        sv_method: 'gram' (default) or 'svdvals'.
        max_rows: row cap for the diversity measure (random fixed subset above it).
        seed: seed for the reference initialisation and the diversity row subsample.

    Returns:
        One row per parameter: ``name, module, module_type, param, shape, ndim, numel``, the
        :data:`STAT_COLUMNS` and, with ``reference_init``, ``init_<stat>`` for each of them.
    """
    modules = dict(model.named_modules())
    names, tensors, meta = [], [], []
    for name, p in model.named_parameters():
        mod_name, _, pname = name.rpartition('.')
        module = modules.get(mod_name)
        names.append(name)
        tensors.append(p)
        meta.append(
            {
                'name': name,
                'module': mod_name,
                'module_type': type(module).__name__ if module is not None else '',
                'param': pname,
                'shape': tuple(p.shape),
                'ndim': p.dim(),
                'numel': p.numel(),
            }
        )
    df = pd.concat([pd.DataFrame(meta), tensor_stats(tensors, sv_method, max_rows, seed)], axis=1)
    if reference_init:
        ref = reference_init_tensors(model, seed)
        have = [i for i, n in enumerate(names) if n in ref and tuple(ref[n].shape) == tuple(tensors[i].shape)]
        init = pd.DataFrame(np.nan, index=df.index, columns=list(STAT_COLUMNS))
        if have:
            uniq: dict[int, int] = {}  # id(tensor) -> position among distinct tensors
            distinct = []
            for i in have:
                t = ref[names[i]]
                if id(t) not in uniq:
                    uniq[id(t)] = len(distinct)
                    distinct.append(t)
            vals = tensor_stats(distinct, sv_method, max_rows, seed).to_numpy()
            init.loc[have] = vals[[uniq[id(ref[names[i]])] for i in have]]
        df = pd.concat([df, init.add_prefix('init_')], axis=1)
        log.debug('reference initialisation for %d of %d tensors', len(have), len(names))
    return df


def model_summary_stats(df: pd.DataFrame) -> pd.Series:
    """Model-level figures from a :func:`weight_stats` frame.

    Returns:
        A Series: ``n_tensors``, ``n_params``, ``global_norm`` (L2 norm of all parameters),
        ``near_zero`` (share over all values), ``n_nonfinite``, and over >=2-D tensors the means of
        ``diversity``, ``eff_rank_ratio`` (effective rank / min(out, rest)), the median ``cond`` and
        the median ``std_ratio`` (std / init_std); ``init_`` counterparts where available.
    """
    mats = df[df['ndim'] >= 2]
    k = mats['shape'].map(lambda s: min(s[0], math.prod(s[1:])) if len(s) >= 2 else np.nan).astype(float)
    out = {
        'n_tensors': len(df),
        'n_params': int(df['numel'].sum()),
        'global_norm': float(np.sqrt((df['norm'] ** 2).sum())),
        'near_zero': float((df['near_zero'] * df['numel']).sum() / max(df['numel'].sum(), 1)),
        'n_nonfinite': int(df['n_nonfinite'].sum()),
        'diversity': float(mats['diversity'].mean()),
        'eff_rank_ratio': float((mats['eff_rank'] / k).mean()),
        'cond_median': float(mats['cond'].median()),
    }
    if 'init_std' in df:
        out['init_diversity'] = float(mats['init_diversity'].mean())
        out['init_eff_rank_ratio'] = float((mats['init_eff_rank'] / k).mean())
        out['init_cond_median'] = float(mats['init_cond'].median())
        out['std_ratio_median'] = float((mats['std'] / mats['init_std']).median())
    return pd.Series(out)


def _as_frame(x: nn.Module | pd.DataFrame, **kwargs) -> pd.DataFrame:
    return x if isinstance(x, pd.DataFrame) else weight_stats(x, reference_init=False, **kwargs)


def compare_stats(
    a: nn.Module | pd.DataFrame,
    b: nn.Module | pd.DataFrame,
    columns: tuple[str, ...] = STAT_COLUMNS,
    **kwargs,
) -> pd.DataFrame:
    """Per-tensor statistics before (``a``) and after (``b``) and their differences.

    Args:
        a: the model (or its :func:`weight_stats` frame) before.
        b: the model (or frame) after; tensors are matched by name.
        columns: which statistics to compare.
        **kwargs: passed to :func:`weight_stats` for arguments that are models.

    Returns:
        One row per tensor name present in both: ``name, shape_a, shape_b``, ``<stat>_a``,
        ``<stat>_b`` and ``d_<stat> = <stat>_b - <stat>_a``; when both are models also
        ``change_norm = ||b - a||``, ``rel_change = change_norm / ||a||`` and ``cosine`` (NaN where
        the shapes differ).
    """
    fa, fb = _as_frame(a, **kwargs), _as_frame(b, **kwargs)
    keep = ['name', 'shape'] + [c for c in columns if c in fa and c in fb]
    merged = fa[keep].merge(fb[keep], on='name', suffixes=('_a', '_b'), how='inner')
    for c in keep[2:]:
        merged[f'd_{c}'] = merged[f'{c}_b'] - merged[f'{c}_a']
    if isinstance(a, nn.Module) and isinstance(b, nn.Module):
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        change, rel, cos = [], [], []
        with torch.no_grad():
            for name in merged['name']:
                x, y = pa[name].detach().cpu().double().flatten(), pb[name].detach().cpu().double().flatten()
                if x.shape != y.shape:
                    change.append(np.nan), rel.append(np.nan), cos.append(np.nan)
                    continue
                d = float((y - x).norm())
                nx, ny = float(x.norm()), float(y.norm())
                change.append(d)
                rel.append(d / nx if nx > 0 else np.nan)
                cos.append(float(x @ y) / (nx * ny) if nx > 0 and ny > 0 else np.nan)
        merged['change_norm'], merged['rel_change'], merged['cosine'] = change, rel, cos
    return merged
