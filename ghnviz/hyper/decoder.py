"""The convolutional parameter decoder: node embedding -> a (out, in, h, w) block of weights.

The decoder maps an embedding to ``C0`` feature maps of ``S x S`` (a linear layer), keeps the
spatial window the target kernel needs, mixes channels with two 1x1 layers into ``out * in``
channels and reshapes to ``(out, in, h, w)``, with ``(out, in, S, S) = max_shape``. Only the rows
of each linear layer that feed the kept window and the kept (out, in) block are evaluated: that
gives exactly the entries a full evaluation followed by slicing would give, for a fraction of the work.

Two cropping rules exist: GHN-2 keeps the top-left window of the ``S x S`` map, GHN-3 keeps a
centred window and upsamples when the kernel is larger than ``S`` (``centred=True``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ghnviz.hyper.layers import Pointwise


class ConvDecoder(nn.Module):
    """Decoder of 2-D/4-D weights (keys ``fc.0``, ``conv.0``, ``conv.2``, ``class_layer_predictor.1``).

    Args:
        in_features: node embedding width.
        widths: widths of the two hidden 1x1 layers ``(C0, C1)`` (GHN-2: ``(4 * hid, 8 * hid)``).
        max_shape: ``(out, in, S, S)``, the largest block decoded at once.
        num_classes: rows of the classifier head.
        conv_layout: store the 1x1 layers as ``(out, in, 1, 1)`` convolution weights (GHN-2 files) or as
            ``(out, in)`` linear weights (GHN-3 files).
        centred: crop the centre of the ``S x S`` map and upsample larger kernels (GHN-3) instead of
            cropping the top-left corner (GHN-2).
    """

    def __init__(
        self,
        in_features: int,
        widths: tuple[int, int],
        max_shape: tuple[int, int, int, int],
        num_classes: int,
        conv_layout: bool = True,
        centred: bool = False,
    ):
        super().__init__()
        self.max_shape = tuple(max_shape)
        self.centred = centred
        c0, c1 = widths
        s = self.max_shape[2]
        self.fc = nn.Sequential(nn.Linear(in_features, c0 * s * s), nn.ReLU())
        self.conv = nn.Sequential(
            Pointwise(c0, c1, conv_layout),
            nn.ReLU(),
            Pointwise(c1, self.max_shape[0] * self.max_shape[1], conv_layout),
            nn.Identity(),
        )
        self.class_layer_predictor = nn.Sequential(
            nn.ReLU(), Pointwise(self.max_shape[0], num_classes, conv_layout)
        )
        self._index_cache: dict[tuple, torch.Tensor] = {}

    def window(self, k: int) -> tuple[int, int]:
        """``[start, stop)`` of the rows (or columns) of the ``S x S`` map kept for kernel size ``k``."""
        s = self.max_shape[2]
        if not self.centred:
            return 0, min(k, s)
        off = s // 2
        return max(0, off - k // 2), min(s, off + math.ceil(k / 2))

    def _fc_rows(self, ys: tuple[int, int], xs: tuple[int, int], device: torch.device) -> torch.Tensor:
        """Rows of ``fc.0`` for the window, ordered (y, x, channel) so the output is channels-last."""
        key = ('fc', ys, xs, device)
        rows = self._index_cache.get(key)
        if rows is None:
            s = self.max_shape[2]
            c0 = self.fc[0].out_features // (s * s)
            y = torch.arange(*ys).view(-1, 1, 1)
            x = torch.arange(*xs).view(1, -1, 1)
            c = torch.arange(c0).view(1, 1, -1)
            rows = (c * s * s + y * s + x).flatten().to(device)
            self._index_cache[key] = rows
        return rows

    def _out_rows(self, n_out: int, n_in: int, device: torch.device) -> torch.Tensor:
        key = ('out', n_out, n_in, device)
        rows = self._index_cache.get(key)
        if rows is None:
            rows = (
                (torch.arange(n_out).view(-1, 1) * self.max_shape[1] + torch.arange(n_in))
                .flatten()
                .to(device)
            )
            self._index_cache[key] = rows
        return rows

    def forward(self, x: torch.Tensor, shape: tuple[int, ...], class_pred: bool = False) -> torch.Tensor:
        """Decode a batch of embeddings that share one target block shape.

        Args:
            x: ``(N, in_features)`` node embeddings.
            shape: ``(out, in, kh, kw)`` block to produce (already clipped/rounded by the caller).
            class_pred: decode a classifier weight: the block's centre tap goes through the classifier head.

        Returns:
            ``(N, min(out, O), min(in, I), kh', kw')`` weights (``kh' = kh`` unless the kernel exceeds the map
            and is not upsampled), or ``(N, num_classes, min(in, I))`` for a classifier.
        """
        n = x.shape[0]
        o_max, i_max, s, _ = self.max_shape
        kh, kw = int(shape[2]), int(shape[3])
        ys, xs = self.window(kh), self.window(kw)
        h, w = ys[1] - ys[0], xs[1] - xs[0]

        fc = self.fc[0]
        if h == w == s:
            z = F.linear(x, fc.weight, fc.bias).view(n, -1, s, s).permute(0, 2, 3, 1)  # (N, S, S, C0)
        else:
            rows = self._fc_rows(ys, xs, x.device)
            z = F.linear(x, fc.weight[rows], fc.bias[rows]).view(n, h, w, -1)  # (N, h, w, C0)
        z = F.relu(z)
        z = F.relu(self.conv[0](z))  # (N, h, w, C1)

        n_out = o_max if class_pred else min(int(shape[0]), o_max)
        n_in = min(int(shape[1]), i_max)
        last = self.conv[2]
        weight, bias = last.matrix, last.bias
        if n_in < i_max:
            rows = self._out_rows(n_out, n_in, x.device)
            weight, bias = weight[rows], bias[rows]
        elif n_out < o_max:
            weight, bias = weight[: n_out * i_max], bias[: n_out * i_max]
        z = F.linear(z, weight, bias).view(n, h, w, n_out, n_in).permute(0, 3, 4, 1, 2)  # (N, out, in, h, w)

        if min(kh, kw) > min(h, w):
            z = F.interpolate(z.reshape(n * n_out, n_in, h, w), (kh, kw), mode='bilinear')
            z = z.view(n, n_out, n_in, kh, kw)

        if class_pred:
            k = z.shape[-1] // 2
            z = self.class_layer_predictor(z[:, :, :, k, k].transpose(1, 2))  # (N, in, num_classes)
            z = z.transpose(1, 2)  # (N, num_classes, in)
        return z
