"""A dispatch mode that records the autograd graph of a forward pass without doing its arithmetic.

Graph building only reads the autograd graph (which ops ran, on which tensors), never the values.
Autograd records its nodes above the dispatch level where :class:`ShapeOnly` intercepts kernels,
so replacing the expensive kernels (convolutions, matrix products, normalisations, ...) by
uninitialised outputs of the right shape leaves the recorded graph unchanged and makes a
ResNet-50 trace several times faster. Cheap ops (activations, additions, views) run as usual on
whatever values they get.

Shapes come from small hand-written rules for the most frequent ops and from the op's meta
kernel otherwise. Anything a rule cannot handle falls back to the meta kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten

__all__ = ['ShapeOnly']


def _broadcastable(t, shape) -> bool:
    return t is None or (
        t.dim() <= len(shape) and all(a in (1, b) for a, b in zip(t.shape[::-1], tuple(shape)[::-1]))
    )


def _conv(inp, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    if (
        transposed
        or not inp.is_contiguous()
        or not weight.is_contiguous()
        or inp.dim() != weight.dim()
        or inp.shape[1] != weight.shape[1] * groups
        or weight.shape[0] % groups
        or (bias is not None and tuple(bias.shape) != (weight.shape[0],))
    ):
        return None  # unusual layouts and invalid arguments: the meta kernel decides
    spatial = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(inp.shape[2:], weight.shape[2:], stride, padding, dilation)
    ]
    if min(spatial, default=1) < 1:
        return None
    return inp.new_empty((inp.shape[0], weight.shape[0], *spatial))  # (N, C_out, *spatial)


def _batch_norm(inp, weight, bias, running_mean, running_var, training, momentum, eps):
    if inp.dim() < 2 or any(
        t is not None and t.numel() != inp.shape[1] for t in (weight, bias, running_mean)
    ):
        return None
    stat = (inp.shape[1],) if training else (0,)  # saved mean/invstd are empty in eval mode
    return torch.empty_like(inp), inp.new_empty(stat), inp.new_empty(stat)


def _layer_norm(inp, normalized_shape, weight, bias, eps):
    shape = tuple(normalized_shape)
    k = len(shape)
    if not k or k > inp.dim() or tuple(inp.shape[-k:]) != shape:
        return None
    if any(t is not None and tuple(t.shape) != shape for t in (weight, bias)):
        return None
    stat = (*inp.shape[:-k], *([1] * k))
    return torch.empty_like(inp), inp.new_empty(stat), inp.new_empty(stat)


def _mm(a, b):
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        return None
    return a.new_empty((a.shape[0], b.shape[1]))


def _addmm(bias, a, b, beta=1, alpha=1):
    out = _mm(a, b)
    return out if out is not None and _broadcastable(bias, out.shape) else None


def _bmm(a, b):
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        return None
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]))


def _baddbmm(bias, a, b, beta=1, alpha=1):
    out = _bmm(a, b)
    return out if out is not None and _broadcastable(bias, out.shape) else None


def _mean(x, dim=None, keepdim=False, dtype=None):
    n = x.dim()
    if dim and any(not -max(n, 1) <= d < max(n, 1) for d in dim):
        return None
    dims = set(range(n)) if not dim else {d % max(n, 1) for d in dim}
    if keepdim:
        shape = [1 if d in dims else s for d, s in enumerate(x.shape)]
    else:
        shape = [s for d, s in enumerate(x.shape) if d not in dims]
    return x.new_empty(shape, dtype=dtype or x.dtype)


def _adaptive_avg_pool2d(x, output_size):
    if x.dim() not in (3, 4) or len(output_size) != 2 or min(x.shape[-2:]) < 1:
        return None
    return x.new_empty((*x.shape[:-2], *output_size))


def _like(x, *args, **kwargs):
    """Unary elementwise ops: a contiguous input gives a contiguous output of the same shape."""
    return torch.empty_like(x) if x.is_contiguous() else None


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: some permutation of the dims is contiguous."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda ss: ss[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _binary(a, b, *args, **kwargs):
    """Binary elementwise ops on floats: broadcast shape, and the layout of the full-shaped operands
    when they share one dense layout and the other operands carry no layout (vary along at most
    one dimension); otherwise the kernel decides."""
    tensors = [t for t in (a, b) if isinstance(t, torch.Tensor)]
    if not isinstance(a, torch.Tensor) or any(t.device != a.device and t.dim() > 0 for t in tensors):
        return None
    try:
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
        dtype = torch.result_type(a, b)
    except RuntimeError:
        return None
    full = [t for t in tensors if t.shape == shape]
    if not dtype.is_floating_point or not full or not _dense(full[0]):
        return None
    if any(t.stride() != full[0].stride() for t in full):
        return None
    for t in tensors:
        if t.shape != shape:
            strides = t.expand(shape).stride()
            if sum(1 for n, s in zip(shape, strides) if n > 1 and s != 0) > 1:
                return None
    return torch.empty_strided(shape, full[0].stride(), dtype=dtype, device=a.device)


def _clone(x, memory_format=None):
    return torch.empty_like(x, memory_format=memory_format or torch.preserve_format)


def _inplace(x, *args, **kwargs):
    """Elementwise in-place ops: keep ``x`` as is when the op would be valid (right broadcast and dtype)."""
    other = args[0] if args else None
    if isinstance(other, torch.Tensor):
        if other.device != x.device and other.dim() > 0:
            return None
        try:
            if torch.broadcast_shapes(x.shape, other.shape) != x.shape:
                return None
        except RuntimeError:
            return None
    if other is not None and not torch.can_cast(torch.result_type(x, other), x.dtype):
        return None
    return x


# op -> rule returning outputs of the right shape (None = use the meta kernel)
_RULES: dict[object, Callable] = {
    aten.convolution.default: _conv,
    aten.native_batch_norm.default: _batch_norm,
    aten.native_layer_norm.default: _layer_norm,
    aten.addmm.default: _addmm,
    aten.mm.default: _mm,
    aten.bmm.default: _bmm,
    aten.baddbmm.default: _baddbmm,
    aten.mean.dim: _mean,
    aten._adaptive_avg_pool2d.default: _adaptive_avg_pool2d,
    aten.clone.default: _clone,
}
# elementwise out-of-place ops (their outputs are often large: allocation dominates)
for _op in (
    aten.gelu.default,
    aten._softmax.default,
    aten.relu.default,
    aten.sigmoid.default,
    aten.silu.default,
    aten.hardswish.default,
    aten.hardsigmoid.default,
    aten.hardtanh.default,
    aten.tanh.default,
):
    _RULES[_op] = _like
for _op in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor):
    _RULES[_op] = _binary
# elementwise in-place ops (activations, residual sums, scaling): their arithmetic is skipped
for _op in (
    aten.relu_.default,
    aten.hardtanh_.default,
    aten.silu_.default,
    aten.hardswish_.default,
    aten.hardsigmoid_.default,
    aten.sigmoid_.default,
    aten.add_.Tensor,
    aten.add_.Scalar,
    aten.mul_.Tensor,
    aten.mul_.Scalar,
    aten.div_.Tensor,
    aten.div_.Scalar,
):
    _RULES[_op] = _inplace

# ops skipped through their meta kernel (expensive, no cheap rule)
_META = {
    aten.max_pool2d_with_indices.default,
    aten.avg_pool2d.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten.native_group_norm.default,
    aten.upsample_bilinear2d.default,
    aten.upsample_nearest2d.default,
}


def _to_meta(x):
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device='meta')
    return x


def _flush_denormal_enabled() -> bool:
    """Whether denormal floats are flushed to zero now (torch has no getter; probe it)."""
    return bool((torch.tensor([1e-40]) * 1.0).item() == 0.0)


class ShapeOnly(TorchDispatchMode):
    """Within this mode, the listed expensive kernels return uninitialised tensors of the right shape.

    The ops that still run read uninitialised memory, which may hold denormal floats (slow to
    compute with), so denormals are flushed to zero inside the mode and the flag is restored on exit.
    """

    def __enter__(self):
        self._flush_before = _flush_denormal_enabled()
        torch.set_flush_denormal(True)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            torch.set_flush_denormal(self._flush_before)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        if rule is not None or func in _META:  # ruled ops fall back to their meta kernel
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            devices = {t.device for t in tensors}
            # one device and one dtype, or the real kernel decides (and reports mismatches)
            if len(devices) == 1 and len({t.dtype for t in tensors}) == 1:
                out = rule(*args, **kwargs) if rule is not None else None
                if out is not None:
                    return out
                device = next(iter(devices))
                try:
                    meta_out = func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))
                except Exception:  # noqa: BLE001 - no meta kernel for these arguments: compute
                    return func(*args, **kwargs)
                return tree_map(
                    lambda m: (
                        torch.empty_strided(m.shape, m.stride(), dtype=m.dtype, device=device)
                        if isinstance(m, torch.Tensor)
                        else m
                    ),
                    meta_out,
                )
        return func(*args, **kwargs)
