"""Layers of the DeepNets-1M network template and the table that builds a cell edge from its op name.

Module attribute names, submodule order and the order of tensor operations in ``forward`` are part of
the contract: parameter names, the seeded initial values (modules are created, and draw from the
global torch generator, in a fixed order) and the traced computation graph all depend on them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn as nn

from ...fastops import attention, dilated_conv2d, fast_kernels_enabled

_KERNEL_TOKEN = re.compile(r'^(\d+)x(\d+)$')


def parse_op_name(op: str) -> tuple[str, int]:
    """Split an op name into its layer kind and kernel size.

    ``'sep_conv_5x5'`` -> ``('sep_conv', 5)``, ``'conv_7x1_1x7'`` -> ``('conv2', 7)`` (two kernel
    tokens make a factorised pair), ``'skip_connect'`` -> ``('skip_connect', 0)``.
    """
    words, sizes = [], []
    for token in op.split('_'):
        match = _KERNEL_TOKEN.match(token)
        if match:
            sizes.append(max(int(match.group(1)), int(match.group(2))))
        else:
            words.append(token)
    kind = '_'.join(words) + ('2' if len(sizes) > 1 else '')
    return kind, max(sizes, default=0)


def norm_layer(norm: str | None, channels: int) -> nn.Module:
    """``'bn...'`` -> BatchNorm2d (running statistics only if the name contains 'track'); None -> Identity."""
    if norm in (None, '', 'none'):
        return nn.Identity()
    if norm.startswith('bn'):
        return nn.BatchNorm2d(channels, track_running_stats='track' in norm)
    raise ValueError(f'unknown norm {norm!r}: expected None, "bn", "bnorm" or "bn-track"')


def is_pruned(module: nn.Module) -> bool:
    """True if some submodule has a ``weight`` attribute set to None (the op was removed by a GHN)."""
    return any(hasattr(m, 'weight') and m.weight is None for m in module.modules())


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples with probability ``drop_prob`` and rescale the rest (training only)."""
    if drop_prob <= 0:
        return x
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)  # (B, 1, 1, 1)
    return x / keep * mask


class ReLUConvBN(nn.Module):
    """ReLU, one k x k convolution (or a 1 x k then k x 1 pair when ``double``), norm."""

    def __init__(self, C_in, C_out, ks=1, stride=1, padding=0, norm='bn', double=False):
        super().__init__()
        self.stride = stride
        if double:
            convs = [
                nn.Conv2d(C_in, C_in, (1, ks), stride=(1, stride), padding=(0, padding), bias=False),
                nn.Conv2d(C_in, C_out, (ks, 1), stride=(stride, 1), padding=(padding, 0), bias=False),
            ]
        else:
            convs = [nn.Conv2d(C_in, C_out, ks, stride=stride, padding=padding, bias=False)]
        self.op = nn.Sequential(nn.ReLU(inplace=False), *convs, norm_layer(norm, C_out))

    def forward(self, x):
        return self.op(x)


class DilConv(nn.Module):
    """ReLU, dilated depthwise convolution, pointwise convolution, norm."""

    def __init__(self, C_in, C_out, ks, stride, padding, dilation, norm='bn'):
        super().__init__()
        self.stride = stride
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(
                C_in, C_in, ks, stride=stride, padding=padding, dilation=dilation, groups=C_in, bias=False
            ),
            nn.Conv2d(C_in, C_out, 1, padding=0, bias=False),
            norm_layer(norm, C_out),
        )

    def forward(self, x):
        relu, dw, pw, norm = self.op
        if dw.weight is not None and fast_kernels_enabled():
            y = dilated_conv2d(relu(x), dw.weight, dw.stride, dw.padding, dw.dilation, dw.groups)
            if y is not None:
                return norm(pw(y))
        return self.op(x)


class SepConv(nn.Module):
    """Two rounds of ReLU, depthwise convolution, pointwise convolution, norm (stride in the first)."""

    def __init__(self, C_in, C_out, ks, stride, padding, norm='bn'):
        super().__init__()
        self.stride = stride
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, ks, stride=stride, padding=padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_in, 1, padding=0, bias=False),
            norm_layer(norm, C_in),
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, ks, stride=1, padding=padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, padding=0, bias=False),
            norm_layer(norm, C_out),
        )

    def forward(self, x):
        return self.op(x)


class Stride(nn.Module):
    """Spatial subsampling by slicing (no parameters)."""

    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if self.stride == 1:
            return x
        return x[:, :, :: self.stride, :: self.stride]


class Zero(nn.Module):
    """The ``none`` op; cells skip it entirely, so ``forward`` is only used when called directly."""

    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """ReLU, then two stride-2 1x1 convolutions on inputs offset by one pixel, concatenated, then norm."""

    def __init__(self, C_in, C_out, norm='bn', stride=2):
        super().__init__()
        if C_out % 2:
            raise ValueError(f'FactorizedReduce needs an even number of output channels, got {C_out}')
        self.stride = stride
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=stride, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=stride, padding=0, bias=False)
        self.bn = norm_layer(norm, C_out)

    def forward(self, x):
        x = self.relu(x)
        shifted = x[:, :, 1:, 1:] if self.stride > 1 else x
        out = torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1)  # (B, C_out, H/2, W/2)
        return self.bn(out)


class ChannelSELayer(nn.Module):
    """Squeeze-and-excitation over channels (C -> C/2 -> C) with a Hardswish gate."""

    def __init__(self, num_channels, reduction_ratio=2, dim_out=None, stride=1):
        super().__init__()
        if dim_out is not None and dim_out != num_channels:
            raise ValueError(f'cse keeps the channel count: {num_channels} in, {dim_out} out')
        self.reduction_ratio = reduction_ratio
        self.stride = stride
        self.fc1 = nn.Linear(num_channels, num_channels // reduction_ratio, bias=True)
        self.fc2 = nn.Linear(num_channels // reduction_ratio, num_channels, bias=True)
        self.relu = nn.ReLU()
        self.sigmoid = nn.Hardswish()  # the gate; named after the usual sigmoid for state-dict parity

    def forward(self, x):
        B, C = x.shape[:2]
        squeezed = x.reshape(B, C, -1).mean(dim=2)  # (B, C)
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(squeezed))))  # (B, C)
        out = torch.mul(x, gate.view(B, C, 1, 1))  # (B, C, H, W)
        if self.stride > 1:
            out = out[:, :, :: self.stride, :: self.stride]
        return out


class FeedForward(nn.Module):
    """Linear, GELU, Dropout, Linear, Dropout."""

    def __init__(self, dim, hidden_dim, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        return self.net(x)


class PosEnc(nn.Module):
    """Learned additive position encoding of shape (1, C, k, k), initialised from a standard normal."""

    def __init__(self, C, ks):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, C, ks, ks))

    def forward(self, x):
        return x + self.weight


class Transformer(nn.Module):
    """Pre-norm self-attention block over the pixels of a feature map (8 heads, MLP hidden = C).

    Takes (B, C, H, W) or (B, N, C); a (B, C, H, W) input is flattened to H*W tokens and the output is
    reshaped back and, with ``stride > 1``, subsampled by slicing.
    """

    def __init__(self, dim, dim_out=None, heads=8, dim_head=None, dropout=0.0, stride=1):
        super().__init__()
        dim_head = dim // heads if dim_head is None else dim_head
        inner_dim = dim_head * heads
        self.stride = stride
        self.heads = heads
        self.scale = dim_head**-0.5
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim_out), nn.Dropout(dropout))
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dim_out)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, hd = t.shape
        return t.reshape(b, n, self.heads, hd // self.heads).permute(0, 2, 1, 3)  # (B, h, N, d)

    def forward(self, x):
        shape = x.shape
        if x.dim() == 4:
            x = x.reshape(shape[0], shape[1], -1).permute(0, 2, 1)  # (B, H*W, C)
        if x.dim() != 3:
            raise ValueError(f'expected a (B, C, H, W) or (B, N, C) input, got {tuple(shape)}')
        residual = x
        x = self.ln1(x)
        q, k, v = map(self._split_heads, self.to_qkv(x).chunk(3, dim=-1))  # 3 x (B, h, N, d)
        out = attention(q, k, v, self.scale)  # (B, h, N, d)
        b, h, n, d = out.shape
        out = out.permute(0, 2, 1, 3).reshape(b, n, h * d)  # (B, N, h*d)
        out = self.to_out(out) + residual
        out = self.ff(self.ln2(out)) + out
        if len(shape) == 4:
            out = out.permute(0, 2, 1).view(shape)  # (B, C, H, W)
            if self.stride > 1:
                out = out[:, :, :: self.stride, :: self.stride]
        return out


# Builders of one cell edge: (C_in, C_out, kernel size, stride, norm) -> module, keyed by op kind.
OpBuilder = Callable[[int, int, int, int, 'str | None'], nn.Module]
OPS: dict[str, OpBuilder] = {
    'none': lambda C_in, C_out, ks, stride, norm: Zero(stride),
    'skip_connect': lambda C_in, C_out, ks, stride, norm: (
        nn.Identity() if stride == 1 else FactorizedReduce(C_in, C_out, norm=norm)
    ),
    'avg_pool': lambda C_in, C_out, ks, stride, norm: nn.AvgPool2d(
        ks, stride=stride, padding=ks // 2, count_include_pad=False
    ),
    'max_pool': lambda C_in, C_out, ks, stride, norm: nn.MaxPool2d(ks, stride=stride, padding=ks // 2),
    'conv': lambda C_in, C_out, ks, stride, norm: ReLUConvBN(C_in, C_out, ks, stride, ks // 2, norm),
    'conv2': lambda C_in, C_out, ks, stride, norm: ReLUConvBN(
        C_in, C_out, ks, stride, ks // 2, norm, double=True
    ),
    'sep_conv': lambda C_in, C_out, ks, stride, norm: SepConv(C_in, C_out, ks, stride, ks // 2, norm=norm),
    'dil_conv': lambda C_in, C_out, ks, stride, norm: DilConv(
        C_in, C_out, ks, stride, ks - ks % 2, 2, norm=norm
    ),
    'msa': lambda C_in, C_out, ks, stride, norm: Transformer(C_in, dim_out=C_out, stride=stride),
    'cse': lambda C_in, C_out, ks, stride, norm: ChannelSELayer(C_in, dim_out=C_out, stride=stride),
}


def patchify_conv(C_out: int, ks: int) -> nn.Conv2d:
    """Non-overlapping k x k patch embedding from RGB (stride k; padding 1 for kernels below 4)."""
    return nn.Conv2d(3, C_out, ks, stride=ks, bias=False, padding=int(ks < 4))
