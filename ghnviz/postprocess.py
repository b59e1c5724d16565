"""Orthogonalisation and noise for predicted parameters.

Implements the transform of "Pretraining a Neural Network before Knowing Its Architecture"
(Knyazev, 2022, arXiv:2207.10049), which improves fine-tuning of GHN-predicted parameters:

1. Number the modules that own a ``weight`` with at least two dimensions from 1, in
   ``model.modules()`` order. The last of them (the classifier) is never changed.
2. A layer is transformed when its number is ``>= layer`` and ``max(out, in) > max_sz``.
3. Noise: the weight is flattened to a tall matrix (``(out, rest)``, transposed when
   ``out < rest``); ``s`` is the standard deviation of all entries of the row correlation matrix of
   that tall matrix. Gaussian noise of std ``beta * s`` is added to ``weight[max_sz:, max_sz:]``
   (the whole weight when ``max_sz == 0``).
4. Orthogonalisation: QR of the same tall matrix, ``Q``'s columns multiplied by ``sign(diag R)``,
   transposed back and reshaped to the weight's shape. The scale of the weight is discarded.

Noise is drawn layer by layer, in module order, from one ``torch.Generator``; with the same seed it
is the same sequence the global RNG gives after ``torch.manual_seed(seed)``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)

# Recipes from the report's code release (ppuda README, section "Fine-tuning predicted parameters",
# update of Jul 21 2022): 100-shot CIFAR-10 fine-tuning of GHN-2-ImageNet predictions with `--init orth
# --beta 3e-5 --layer 37` for ResNet-50 and `--layer 94` for ConvNeXt-Base (the report's "100" is
# corrected to 94 there). 'ghn3' is the noise-only setting the GHN-3 trainer applies to predicted
# parameters before training (orth=False, beta=1e-5).
PRESETS: dict[str, dict] = {
    'resnet50': dict(orth=True, beta=3e-5, layer=37),
    'convnext': dict(orth=True, beta=3e-5, layer=94),
    'ghn3': dict(orth=False, beta=1e-5, layer=0),
}


@dataclass
class LayerRecord:
    """What :func:`postprocess` did to one module with a >=2-D weight."""

    index: int  # 1-based number among modules with a >=2-D weight
    name: str  # module path in the model
    shape: tuple[int, ...]  # weight shape
    action: str  # 'orth+noise', 'orth', 'noise' or 'skipped (<reason>)'
    noise_std: float = 0.0  # beta * std(corrcoef) actually used (0 when no noise)
    change_norm: float = 0.0  # ||w_after - w_before||_F


@dataclass
class PostprocessResult:
    """The (possibly copied) model and one record per module with a >=2-D weight."""

    model: nn.Module
    records: list[LayerRecord] = field(default_factory=list)

    def frame(self):
        """The records as a pandas DataFrame (one row per layer)."""
        import pandas as pd

        return pd.DataFrame([asdict(r) for r in self.records])

    def changed(self) -> list[str]:
        """Names of modules whose weight was changed."""
        return [r.name for r in self.records if not r.action.startswith('skipped')]


def weight_to_tall(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Flattens an n-D weight to ``(out, rest)`` and transposes it when it is wide.

    Returns:
        The tall matrix ``(max(out, rest), min(out, rest))`` and whether it was transposed.
    """
    mat = w.reshape(w.shape[0], -1)  # (out, rest)
    wide = mat.shape[0] < mat.shape[1]
    return (mat.t() if wide else mat), wide


def orthogonalize(w: torch.Tensor) -> torch.Tensor:
    """Orthonormal factor of the tall-flattened weight, with QR's sign ambiguity removed.

    Args:
        w: a weight with at least two dimensions.

    Returns:
        A contiguous tensor of ``w``'s shape whose tall flattening has orthonormal columns.
    """
    return orthogonalize_batch(w.unsqueeze(0))[0]


def orthogonalize_batch(ws: torch.Tensor) -> torch.Tensor:
    """:func:`orthogonalize` over a stack of same-shape weights ``(B, out, ...)``, in one QR call."""
    mats = ws.reshape(ws.shape[0], ws.shape[1], -1)  # (B, out, rest)
    wide = mats.shape[1] < mats.shape[2]
    if wide:
        mats = mats.transpose(1, 2)  # (B, rest, out)
    q, r = torch.linalg.qr(mats)  # q: (B, rows, cols), r: (B, cols, cols)
    q = q * torch.diagonal(r, dim1=1, dim2=2).sign().unsqueeze(1)  # flip columns so diag(R) >= 0
    if wide:
        q = q.transpose(1, 2)  # (B, out, rest)
    return q.reshape(ws.shape).contiguous()


def corr_std(w: torch.Tensor, exact: bool = True) -> torch.Tensor:
    """Std of all entries of the row correlation matrix of the tall-flattened weight (0-d tensor).

    Args:
        w: a weight with at least two dimensions.
        exact: build the full ``(rows, rows)`` matrix with ``torch.corrcoef`` (bitwise the value the
            published code uses). ``False`` uses ``sum(C) = |Z^T 1|^2`` and ``sum(C^2) = |Z^T Z|_F^2``
            with ``Z`` the centred, unit-norm rows (sums in float64): ``(cols, cols)`` work instead of
            ``(rows, rows)``, equal to the exact value to about 1e-6 relative.

    Rows with zero variance give NaN correlations; those entries are ignored (with a warning) so
    that a constant row cannot turn the noise into NaN.
    """
    tall = weight_to_tall(w)[0]  # (rows, cols), rows >= cols
    if not exact:
        z = tall - tall.mean(1, keepdim=True)  # (rows, cols)
        norms = z.norm(dim=1, keepdim=True)  # (rows, 1)
        ok = norms.squeeze(1) > 0
        z = z[ok] / norms[ok]  # drop constant rows, like the NaN entries below
        n = float(z.shape[0]) ** 2
        if z.shape[0] < tall.shape[0]:
            log.warning('%d constant rows ignored in the correlation', tall.shape[0] - z.shape[0])
        if n < 2:
            return torch.zeros((), dtype=w.dtype)
        s1 = z.sum(0, dtype=torch.float64).square().sum()  # sum of all correlations
        s2 = (z.t() @ z).double().square().sum()  # sum of squared correlations
        return ((s2 - s1 * s1 / n) / (n - 1)).clamp_min(0).sqrt().to(w.dtype)
    corr = torch.corrcoef(tall).flatten()  # (rows * rows,)
    std = corr.std()
    if torch.isnan(std):
        finite = corr[torch.isfinite(corr)]
        log.warning(
            'correlation has %d NaN entries (constant rows); ignoring them', corr.numel() - finite.numel()
        )
        std = finite.std() if finite.numel() > 1 else torch.zeros((), dtype=corr.dtype)
    return std


def _make_generator(seed: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator()
    if seed is None:
        gen.seed()  # non-deterministic, but still independent of the global RNG
    else:
        gen.manual_seed(int(seed))
    return gen


def _layers_2d(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(getattr(m, 'weight', None), torch.Tensor) and m.weight.dim() >= 2
    ]


def postprocess(
    model: nn.Module,
    orth: bool = True,
    beta: float = 0.0,
    layer: int = 0,
    max_sz: int = 0,
    seed: int | torch.Generator | None = None,
    inplace: bool = True,
    preset: str | None = None,
    exact: bool = True,
) -> PostprocessResult:
    """Adds noise to and/or orthogonalises the >=2-D weights of a model (see the module docstring).

    Args:
        model: the network, typically with GHN-predicted parameters.
        orth: replace each transformed weight by its orthonormal QR factor.
        beta: noise scale relative to the std of the weight's correlation matrix (0: no noise).
        layer: first 1-based layer number to transform; earlier layers are left as they are.
        max_sz: transform only layers with ``max(out, in) > max_sz``; noise goes to
            ``weight[max_sz:, max_sz:]``.
        seed: seed (or a Generator) for the noise; ``None`` draws a fresh seed.
        inplace: change ``model`` itself; otherwise a deep copy is changed and returned.
        preset: name in :data:`PRESETS`; its values replace ``orth``, ``beta`` and ``layer``.
        exact: compute the noise scale exactly as the published code (see :func:`corr_std`);
            ``False`` is several times faster on large layers and differs by about 1e-6 relative.

    Returns:
        A :class:`PostprocessResult` with the model and one :class:`LayerRecord` per layer.
    """
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f'unknown preset {preset!r}; valid presets: {sorted(PRESETS)}')
        orth, beta, layer = (PRESETS[preset][k] for k in ('orth', 'beta', 'layer'))
    if not inplace:
        model = copy.deepcopy(model)
    gen = _make_generator(seed)
    layers = _layers_2d(model)
    n_layers = len(layers)
    records: list[LayerRecord] = []
    to_orth: list[tuple[LayerRecord, torch.Tensor, torch.Tensor]] = []  # (record, weight, weight before)

    for idx, (name, module) in enumerate(layers, start=1):
        w = module.weight.data
        rec = LayerRecord(index=idx, name=name, shape=tuple(w.shape), action='')
        records.append(rec)
        if idx == n_layers:
            rec.action = 'skipped (classifier)'
        elif idx < layer:
            rec.action = f'skipped (index < layer={layer})'
        elif max(w.shape[:2]) <= max_sz:
            rec.action = f'skipped (max(out, in) <= max_sz={max_sz})'
        elif not orth and beta <= 0:
            rec.action = 'skipped (orth=False, beta=0)'
        if rec.action:
            continue
        before = w.clone()
        actions = []
        if beta > 0:
            std = beta * corr_std(w, exact)  # 0-d, the weight's dtype
            sub = w[max_sz:, max_sz:]
            noise = torch.randn(sub.shape, generator=gen, dtype=w.dtype, device='cpu').to(w.device)
            sub.add_(std * noise)
            rec.noise_std = float(std)
            actions.append('noise')
        if orth:
            to_orth.append((rec, w, before))
            actions.insert(0, 'orth')
        else:
            rec.change_norm = float((w - before).norm())
        rec.action = '+'.join(actions)

    # QR is independent per layer: one batched call per weight shape.
    groups: dict[tuple, list[tuple[LayerRecord, torch.Tensor, torch.Tensor]]] = {}
    for item in to_orth:
        groups.setdefault((tuple(item[1].shape), item[1].dtype, item[1].device), []).append(item)
    for items in groups.values():
        q = orthogonalize_batch(torch.stack([w for _, w, _ in items]))  # (B, *shape)
        for (rec, w, before), qi in zip(items, q):
            w.copy_(qi)
            rec.change_norm = float((w - before).norm())

    log.info(
        'postprocess(orth=%s, beta=%g, layer=%d, max_sz=%d): %d of %d layers changed',
        orth,
        beta,
        layer,
        max_sz,
        len([r for r in records if not r.action.startswith('skipped')]),
        n_layers,
    )
    return PostprocessResult(model=model, records=records)
