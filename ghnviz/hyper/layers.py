"""Small building blocks shared by the GHN architectures: MLPs, 1x1 projections, the shape encoder."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """Linear layers with ReLU between them, held in ``self.fc`` (keys ``fc.0``, ``fc.2``, ...).

    Args:
        in_features: input width.
        widths: output width of each linear layer.
        last_relu: also apply ReLU after the last layer (the GHN-2 message MLPs do, its 1-D decoder does not).
    """

    def __init__(self, in_features: int, widths: Sequence[int], last_relu: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        for j, width in enumerate(widths):
            layers.append(nn.Linear(in_features if j == 0 else widths[j - 1], width))
            layers.append(nn.ReLU() if (j < len(widths) - 1 or last_relu) else nn.Identity())
        self.fc = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Pointwise(nn.Linear):
    """A linear map stored as a linear weight ``(out, in)`` or as a 1x1 convolution ``(out, in, 1, 1)``.

    Both layouts compute the same thing; the storage layout only decides the state-dict shapes
    (GHN-2 checkpoints hold 1x1 convolutions, GHN-3 checkpoints linear weights).
    """

    def __init__(self, in_features: int, out_features: int, conv_layout: bool = False):
        super().__init__(in_features, out_features)
        if conv_layout:
            self.weight = nn.Parameter(self.weight.data.view(out_features, in_features, 1, 1))

    @property
    def matrix(self) -> torch.Tensor:
        """The weight as an ``(out, in)`` matrix (a view)."""
        return self.weight.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.matrix, self.bias)


def tensor_shape_to_4d(shape: Sequence[int]) -> tuple[int, int, int, int]:
    """Map a parameter shape to the (out, in, h, w) the shape encoder embeds.

    1-D ``(c,)`` -> ``(c, 1, 1, 1)``; 2-D ``(o, i)`` -> ``(o, i, 1, 1)``; a position embedding
    ``(1, n, d)`` -> ``(1, d, s, s)`` with ``s = floor(sqrt(n))``; else ``(a, b, c)`` -> ``(a, b, c, 1)``
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1:
        return (shape[0], 1, 1, 1)
    if len(shape) == 2:
        return (shape[0], shape[1], 1, 1)
    if len(shape) == 3:
        if shape[0] == 1 and min(shape[1:]) > 1:
            s = int(math.floor(shape[1] ** 0.5))
            return (1, shape[2], s, s)
        return (shape[0], shape[1], shape[2], 1)
    return shape[:4]  # type: ignore[return-value]


class ShapeEncoder(nn.Module):
    """Embeds a tensor shape (out, in, h, w) as four lookups of width ``hid // 4``, concatenated.

    Channel counts and kernel sizes are binned into the tables the published GHNs were trained
    with; a shape the tables lack maps to the nearest entry, and a missing shape to a dummy row.

    Args:
        hid: embedding width (the concatenation of the four lookups).
        num_classes: classifier width of the training task (a channel value of its own).
        max_shape: decoder's maximal shape; its spatial size widens the kernel-size table.
    """

    def __init__(self, hid: int, num_classes: int, max_shape: Sequence[int]):
        super().__init__()
        channels = np.unique(
            [1, 3, num_classes]
            + list(range(8, 64, 8))
            + list(range(64, 4096, 16))
            + list(range(4096, 8193, 32))
        )
        spatial = np.unique(list(range(1, max(12, max_shape[3]), 2)) + [14, 16])
        self.channel_table = _nearest_table(channels, {c: 8 for c in range(4, 8)})  # (8193,)
        self.spatial_table = _nearest_table(spatial, {2: 3})  # (17,)
        self.n_channels, self.n_spatial = len(channels), len(spatial)
        self.embed_spatial = nn.Embedding(self.n_spatial + 1, hid // 4)
        self.embed_channel = nn.Embedding(self.n_channels + 1, hid // 4)

    def shape_indices(self, shapes: Sequence[Sequence[int] | None]) -> torch.Tensor:
        """Table rows for each shape (``None`` = no shape), as a ``(n, 4)`` long tensor."""
        out = np.empty((len(shapes), 4), dtype=np.int64)
        out[:, :2] = self.n_channels  # dummy rows
        out[:, 2:] = self.n_spatial
        for k, shape in enumerate(shapes):
            if shape is None:
                continue
            s4 = tensor_shape_to_4d(shape)
            out[k, 0] = _lookup(self.channel_table, s4[0])
            out[k, 1] = _lookup(self.channel_table, s4[1])
            out[k, 2] = _lookup(self.spatial_table, s4[2])
            out[k, 3] = _lookup(self.spatial_table, s4[3])
        return torch.from_numpy(out)

    def forward(self, shape_ind: torch.Tensor) -> torch.Tensor:
        """``(n, 4)`` table rows -> ``(n, hid)`` shape embeddings."""
        n = shape_ind.shape[0]
        ch = self.embed_channel(shape_ind[:, :2]).reshape(n, -1)  # (n, hid/2)
        sp = self.embed_spatial(shape_ind[:, 2:]).reshape(n, -1)  # (n, hid/2)
        return torch.cat((ch, sp), dim=1)  # (n, hid)


def _nearest_table(values: np.ndarray, overrides: dict[int, int]) -> np.ndarray:
    """Row index for every integer 0..max(values): overrides first, then exact rows, else the nearest value.

    Index 0 maps to the largest value's row (as unseen sizes do). Ties go to the smaller value.
    """
    pos = {int(v): i for i, v in enumerate(values)}
    grid = np.arange(int(values[-1]) + 1)
    table = np.abs(grid[:, None] - values[None, :]).argmin(axis=1)  # (max + 1,) nearest row, first on ties
    table[0] = len(values) - 1
    for c, target in overrides.items():
        table[c] = pos[target]
    return table.astype(np.int64)


def _lookup(table: np.ndarray, value: int) -> int:
    return int(table[value]) if 0 <= value < len(table) else int(table[-1])
