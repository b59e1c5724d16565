"""Faster kernels for two DeepNets-1M ops, for ghnviz's training, evaluation and fine-tuning loops.

A network's forward pass is, by default, written exactly as the reference writes it: a dilated
depthwise ``conv2d``, and attention as ``einsum -> softmax -> einsum``. Graphs are read from the
autograd graph of such a pass (by ghnviz and by the reference code alike), so that default is what
keeps a network's computation graph faithful. Inside :func:`fast_kernels` the same arithmetic runs
through cheaper kernels, with results equal up to float rounding:

* :func:`dilated_conv2d`: a dilated convolution as an undilated one over the ``d x d`` phases of the
  input (space-to-batch), or over the input subsampled by ``d`` when the stride equals the dilation.
  PyTorch's CPU backward of dilated depthwise convolutions is a slow generic path
  (``benchmarks/bench_ops.py`` measures both).
* :func:`attention`: ``torch.nn.functional.scaled_dot_product_attention`` (one fused kernel forward
  and backward) instead of two einsums and a softmax.

Under bf16 on CPU (``--amp bf16`` autocast, or bf16 tensors) the choice differs, because PyTorch's
bf16 CPU kernels do not rank the same way as its fp32 ones (``benchmarks/bench_ops.py --amp bf16``):
the fused attention runs in fp32 (its bf16 CPU kernel is several times slower than the einsums over
the short sequences of most cells), and 5x5 dilated convolutions with stride 1 keep the plain
convolution (the space-to-batch form gains nothing there in bf16, and loses on small maps).

The training, evaluation and fine-tuning loops enter :func:`fast_kernels`; graph building always
runs inside :func:`reference_kernels`. ``GHNVIZ_REFERENCE_KERNELS=1`` in the environment keeps the
reference kernels everywhere (to compare the two).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F

__all__ = ['attention', 'dilated_conv2d', 'fast_kernels', 'fast_kernels_enabled', 'reference_kernels']

_fast: ContextVar[bool] = ContextVar('ghnviz_fast_kernels', default=False)
_FORCE_REFERENCE = os.environ.get('GHNVIZ_REFERENCE_KERNELS', '') == '1'


@contextlib.contextmanager
def fast_kernels(enabled: bool = True) -> Iterator[None]:
    """Run the block with the faster kernels (``enabled=False``: with the reference ones)."""
    token = _fast.set(enabled and not _FORCE_REFERENCE)
    try:
        yield
    finally:
        _fast.reset(token)


def reference_kernels() -> contextlib.AbstractContextManager[None]:
    """Run the block with the reference formulation of every op (as graph tracing needs)."""
    return fast_kernels(False)


def fast_kernels_enabled() -> bool:
    """True inside :func:`fast_kernels` (and not inside a nested :func:`reference_kernels`)."""
    return _fast.get()


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _low_precision_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The half-precision dtype ``x``'s CPU ops compute in (bf16/fp16 tensors or CPU autocast), else None."""
    if x.dtype in (torch.bfloat16, torch.float16):
        return x.dtype
    if torch.is_autocast_enabled('cpu'):
        dtype = torch.get_autocast_dtype('cpu')
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
    return None


def dilated_conv2d(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int):
    """``F.conv2d(x, weight, None, stride, padding, dilation, groups)`` without a dilated kernel.

    Handles equal dilations ``d > 1`` on both axes, numeric zero padding and a stride of 1 or of ``d``
    (the DeepNets-1M ``dil_conv`` cases); returns None for anything else, and the caller runs the
    plain convolution. Only used on CPU, where PyTorch's dilated backward is slow.
    """
    (dh, dw), (sh, sw) = _pair(dilation), _pair(stride)
    if isinstance(padding, str) or x.dim() != 4 or x.device.type != 'cpu':
        return None
    ph, pw = _pair(padding)
    if dh != dw or dh < 2 or sh != sw or sh not in (1, dh) or ph != pw:
        return None
    if sh == 1 and max(weight.shape[-2:]) > 3 and _low_precision_dtype(x) is not None:
        return None  # bf16 CPU kernels: no faster than the plain dilated convolution
    d, p = dh, ph
    n, c, h, w = x.shape
    kh, kw = weight.shape[-2:]
    hp, wp = h + 2 * p, w + 2 * p
    out_h, out_w = hp - d * (kh - 1), wp - d * (kw - 1)  # stride-1 output size
    if out_h < 1 or out_w < 1:
        return None
    extra_h, extra_w = -hp % d, -wp % d  # pad to a multiple of d (the extra rows are cropped away)
    xp = F.pad(x, (p, p + extra_w, p, p + extra_h))
    if sh == d:
        # out[i] = sum_k w[k] xp[i*d + k*d]: an undilated convolution of every d-th row and column
        y = F.conv2d(xp[:, :, ::d, ::d], weight, groups=groups)
        return y[:, :, : (out_h - 1) // d + 1, : (out_w - 1) // d + 1]
    # out[a*d + r] = sum_k w[k] xp[(a + k)*d + r]: one undilated convolution per phase r (rows and
    # columns), the d*d phases stacked along the batch; done in NHWC order, which keeps the reshapes
    # cheap and the convolutions on their channels-last kernels.
    hq, wq = (hp + extra_h) // d, (wp + extra_w) // d
    phases = (
        xp.permute(0, 2, 3, 1)  # (N, Hp, Wp, C)
        .reshape(n, hq, d, wq, d, c)
        .permute(2, 4, 0, 1, 3, 5)  # (d, d, N, Hq, Wq, C)
        .reshape(d * d * n, hq, wq, c)
        .permute(0, 3, 1, 2)  # (d*d*N, C, Hq, Wq), channels-last strides
    )
    yb = F.conv2d(phases, weight, groups=groups)  # (d*d*N, C_out, Hq-kh+1, Wq-kw+1)
    c_out, yh, yw = yb.shape[1:]
    y = (
        yb.permute(0, 2, 3, 1)
        .reshape(d, d, n, yh, yw, c_out)
        .permute(2, 3, 0, 4, 1, 5)  # (N, yh, d, yw, d, C_out)
        .reshape(n, yh * d, yw * d, c_out)
        .permute(0, 3, 1, 2)  # (N, C_out, yh*d, yw*d)
    )
    return y[:, :, :out_h, :out_w]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` over (B, heads, N, d) tensors, fused when fast kernels are on."""
    if fast_kernels_enabled():
        low = _low_precision_dtype(q) if q.device.type == 'cpu' else None
        if low is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        # the fused CPU kernel is slow in bf16 over short sequences: run it in fp32, return the dtype
        # the reference formulation would (the autocast dtype, or the inputs' dtype)
        with torch.autocast('cpu', enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
        return y.to(low)
    dots = torch.einsum('bhid,bhjd->bhij', q, k) * scale  # (B, h, N, N)
    return torch.einsum('bhij,bhjd->bhid', dots.softmax(dim=-1), v)  # (B, h, N, d)
