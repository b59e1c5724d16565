"""The DeepNets-1M network template: a stem, a stack of cells built from a genotype, and a classifier.

Reduction cells sit at ``n_cells // 3`` and ``2 * n_cells // 3``: they multiply the width by
``C_mult`` and halve the resolution (except in transformer-style networks, which keep it).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .genotypes import Genotype, normalize_genotype
from .ops import (
    OPS,
    FactorizedReduce,
    PosEnc,
    ReLUConvBN,
    Stride,
    Zero,
    drop_path,
    is_pruned,
    norm_layer,
    parse_op_name,
    patchify_conv,
)


class Cell(nn.Module):
    """One cell: preprocess the two inputs, compute ``steps`` two-edge sums, concatenate some of them."""

    def __init__(
        self,
        genotype: Genotype,
        C_prev_prev: int,
        C_prev: int,
        C_in: int,
        C_out: int,
        reduction: bool,
        reduction_prev: bool,
        norm: str | None = 'bn',
        preproc: bool = True,
        is_vit: bool = False,
        cell_ind: int = 0,
    ):
        super().__init__()
        self._is_vit = is_vit
        self._cell_ind = cell_ind  # read by code that groups parameters per cell
        self._has_none = any(op == 'none' for op, _ in genotype.normal + genotype.reduce)
        self.genotype = genotype

        shrink_s0 = reduction_prev and not is_vit  # s0 is at twice the resolution of s1
        if preproc:
            self.preprocess0 = (
                FactorizedReduce(C_prev_prev, C_out, norm=norm)
                if shrink_s0
                else ReLUConvBN(C_prev_prev, C_out, norm=norm)
            )
            self.preprocess1 = ReLUConvBN(C_prev, C_out, norm=norm)
        else:
            self.preprocess0 = Stride(stride=2) if shrink_s0 else nn.Identity()
            self.preprocess1 = nn.Identity()

        edges = genotype.reduce if reduction else genotype.normal
        self._concat = list(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.multiplier = len(self._concat)
        self._steps = len(edges) // 2
        self._indices = [index for _, index in edges]
        self._ops = nn.ModuleList()
        for op_name, index in edges:
            stride = 2 if (reduction and index < 2 and not is_vit) else 1
            kind, ks = parse_op_name(op_name)
            self._ops.append(OPS[kind](C_in if index <= 1 else C_out, C_out, ks, stride, norm))

    def _apply_edge(self, op: nn.Module, h: torch.Tensor | None, drop_prob: float) -> torch.Tensor | None:
        if h is None or isinstance(op, Zero) or is_pruned(op):
            return None
        h = op(h)
        if self.training and drop_prob > 0 and not isinstance(op, nn.Identity):
            h = drop_path(h, drop_prob)
        return h

    def forward(self, s0, s1, drop_path_prob: float = 0.0):
        s0 = None if (s0 is None or is_pruned(self.preprocess0)) else self.preprocess0(s0)
        s1 = None if (s1 is None or is_pruned(self.preprocess1)) else self.preprocess1(s1)

        states = [s0, s1]
        for i in range(self._steps):
            h1 = self._apply_edge(self._ops[2 * i], states[self._indices[2 * i]], drop_path_prob)
            h2 = self._apply_edge(self._ops[2 * i + 1], states[self._indices[2 * i + 1]], drop_path_prob)
            if h1 is not None and h2 is not None:
                states.append(h1 + h2)
            else:
                states.append(h1 if h1 is not None else h2)

        outputs = [states[i] for i in self._concat]
        if any(s is None for s in outputs):
            # nodes cut off by 'none' edges contribute zeros shaped like a live node
            live = next((s for s in outputs if s is not None), None)
            if live is None:
                return None
            dummy = live * 0
            outputs = [dummy if s is None else s for s in outputs]
        return torch.cat(outputs, dim=1)  # (B, multiplier * C, H, W)


class AuxiliaryHeadCIFAR(nn.Module):
    """Auxiliary classifier on an 8x8 feature map (training only)."""

    def __init__(self, C, num_classes, norm='bn', pool_sz=5):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.AvgPool2d(pool_sz, stride=min(pool_sz, 3), padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False),
            norm_layer(norm, 128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            norm_layer(norm, 768),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.reshape(x.size(0), -1))


class AuxiliaryHeadImageNet(nn.Module):
    """Auxiliary classifier on a 14x14 feature map (training only); no norm after the second conv."""

    def __init__(self, C, num_classes, norm='bn'):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.AvgPool2d(5, stride=2, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False),
            norm_layer(norm, 128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.reshape(x.size(0), -1))


class Network(nn.Module):
    """A DeepNets-1M network.

    Args:
        C: width of the first cells (channels of each concatenated node).
        num_classes: classifier outputs.
        genotype: the cell pair (:class:`Genotype`).
        n_cells: number of cells.
        ks: kernel size of the stem convolution.
        is_imagenet_input: 224x224 inputs (stride-4 stem) rather than 32x32.
        stem_pool: add a 3x3 stride-2 max-pool to the simple stem.
        stem_type: 0 = one conv + norm, 1 = the two-part stem of DARTS ImageNet networks.
        is_vit: use the patchify stem and position encoding; None = if the genotype has an ``msa`` op.
        norm: ``'bn-track'`` (BatchNorm with running statistics), ``'bn'``/``'bnorm'`` (batch
            statistics always) or None (no normalisation).
        preproc: 1x1 ReLU-conv-norm (or factorized reduction) on the cell inputs.
        C_mult: width multiplier at each reduction cell.
        fc_layers: linear layers in the classifier (0 and 1 both mean one).
        fc_dim: hidden width of the classifier when ``fc_layers > 1``.
        glob_avg: global average pooling before the classifier, else flatten.
        auxiliary: add an auxiliary head after cell ``2 * n_cells // 3``.
        imagenet_stride: stride of the simple stem on ImageNet inputs.
        light: allocate nothing: parameters live on the ``meta`` device (shapes only), for counting
            parameters or building graphs whose tensors are filled in later.

    ``forward`` returns the logits, or ``(logits, aux_logits)`` in training mode with ``auxiliary``.
    """

    def __init__(
        self,
        C: int,
        num_classes: int,
        genotype: Genotype,
        n_cells: int,
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
        auxiliary: bool = False,
        imagenet_stride: int = 4,
        light: bool = False,
    ):
        super().__init__()
        genotype = normalize_genotype(genotype)
        self.genotype = genotype
        self._C = C
        self._auxiliary = auxiliary
        self.drop_path_prob = 0.0
        self.expected_input_sz = 224 if is_imagenet_input else 32  # read by graph builders
        has_msa = any(op == 'msa' for op, _ in genotype.normal + genotype.reduce)
        self._is_vit = has_msa if is_vit is None else is_vit  # patchify stem, no spatial reductions
        self._stem_type = stem_type
        self._n_cells = n_cells
        self._glob_avg = glob_avg
        self._auxiliary_cell_ind = 2 * n_cells // 3

        steps = len(genotype.normal_concat)  # inputs of each cell's concatenation
        if (steps > 1 or C_mult > 1) and not preproc:
            raise ValueError('preproc=False needs cells with a single output node and C_mult=1')
        if stem_type not in (0, 1):
            raise ValueError(f'stem_type must be 0 (simple) or 1 (DARTS ImageNet style), got {stem_type}')
        if fc_layers > 1 and fc_dim <= 0:
            raise ValueError(f'fc_layers={fc_layers} needs fc_dim > 0')

        with torch.device('meta') if light else contextlib.nullcontext():
            C_stem = self._build_stem(C, ks, is_imagenet_input, stem_pool, norm, preproc, imagenet_stride)
            C_last = self._build_cells(
                C, C_stem, num_classes, is_imagenet_input, stem_pool, norm, preproc, C_mult
            )
            self._build_head(C_last, num_classes, is_imagenet_input, stem_pool, fc_layers, fc_dim)

    def _build_stem(self, C, ks, is_imagenet_input, stem_pool, norm, preproc, imagenet_stride) -> int:
        """Create the stem; returns the width of the first cells' inputs."""
        if self._is_vit:
            self.stem0 = patchify_conv(C, 16 if is_imagenet_input else 3)
            self.pos_enc = PosEnc(C, 14 if is_imagenet_input else 11)
        elif self._stem_type == 0:
            C_stem = C * (3 if (preproc and not is_imagenet_input) else 1)
            stride = imagenet_stride if is_imagenet_input else 1
            self.stem = nn.Sequential(
                nn.Conv2d(3, C_stem, ks, stride=stride, padding=ks // 2, bias=False),
                norm_layer(norm, C_stem),
                nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=False) if stem_pool else nn.Identity(),
            )
            return C_stem
        else:
            stride = 2 if is_imagenet_input else 1
            self.stem0 = nn.Sequential(
                nn.Conv2d(3, C // 2, ks, stride=stride, padding=ks // 2, bias=False),
                norm_layer(norm, C // 2),
                nn.ReLU(inplace=True),
                nn.Conv2d(C // 2, C, 3, stride=stride, padding=1, bias=False),
                norm_layer(norm, C),
            )
            self.stem1 = nn.Sequential(
                nn.ReLU(inplace=True),
                nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
                norm_layer(norm, C),
            )
        return C

    def _build_cells(
        self, C, C_stem, num_classes, is_imagenet_input, stem_pool, norm, preproc, C_mult
    ) -> int:
        """Create the cells (and the auxiliary head); returns the width of the last cell's output."""
        stem_type = self._stem_type
        steps = len(self.genotype.normal_concat)  # inputs of each cell's concatenation
        C_prev_prev = C_prev = C_stem
        C_curr = C
        n_cells = self._n_cells
        reductions = {n_cells // 3, 2 * n_cells // 3} - {0}
        self.cells = nn.ModuleList()
        reduction_prev = stem_type == 1
        for cell_ind in range(n_cells):
            reduction = cell_ind in reductions
            if reduction:
                C_curr *= C_mult
            widen_out = (cell_ind + 1) in reductions and steps == 1 and not preproc
            cell = Cell(
                self.genotype,
                C_prev_prev,
                C_prev,
                C_in=C_curr if preproc else C_prev,
                C_out=C_curr * (C_mult if widen_out else 1),
                reduction=reduction,
                reduction_prev=reduction_prev,
                norm=norm,
                preproc=preproc,
                is_vit=self._is_vit,
                cell_ind=cell_ind,
            )
            self.cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if self._auxiliary and cell_ind == self._auxiliary_cell_ind:
                if is_imagenet_input:
                    self.auxiliary_head = AuxiliaryHeadImageNet(C_prev, num_classes, norm=norm)
                else:
                    pool_sz = 2 if (stem_type == 1 or stem_pool) else 5
                    self.auxiliary_head = AuxiliaryHeadCIFAR(C_prev, num_classes, norm=norm, pool_sz=pool_sz)
        return C_prev

    def _build_head(self, C_prev, num_classes, is_imagenet_input, stem_pool, fc_layers, fc_dim):
        if self._glob_avg:
            self.global_pooling = nn.AdaptiveAvgPool2d(1)
        else:
            downsampled = self._stem_type == 1 or stem_pool
            side = (7 if downsampled else 14) if is_imagenet_input else (4 if downsampled else 8)
            C_prev *= side**2  # the flattened final feature map
        layers = [nn.Linear(C_prev, fc_dim if fc_layers > 1 else num_classes)]
        for i in range(fc_layers - 1):
            layers += [
                nn.ReLU(inplace=True),
                nn.Dropout(p=0.5, inplace=False),
                nn.Linear(fc_dim, fc_dim if i < fc_layers - 2 else num_classes),
            ]
        self.classifier = nn.Sequential(*layers)

    def forward(self, x):
        if self._is_vit:
            s0 = s1 = self.pos_enc(self.stem0(x))
        elif self._stem_type == 1:
            s0 = self.stem0(x)
            s1 = None if is_pruned(self.stem1) else self.stem1(s0)
        else:
            s0 = s1 = self.stem(x)

        logits_aux = None
        for cell_ind, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if self._auxiliary and self.training and cell_ind == self._auxiliary_cell_ind:
                small_vit = self._is_vit and self.expected_input_sz == 32
                logits_aux = self.auxiliary_head(F.adaptive_avg_pool2d(s1, 8) if small_vit else s1)
        if s1 is None:
            raise ValueError('invalid network: the last cell produces no output (all its paths are "none")')
        out = self.global_pooling(s1) if self._glob_avg else s1
        logits = self.classifier(out.reshape(out.size(0), -1))  # (B, num_classes)
        if self._auxiliary and self.training:
            return logits, logits_aux
        return logits
