"""The faster kernels of ghnviz.fastops compute what the reference ops compute, and never reach a graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ghnviz.fastops import attention, dilated_conv2d, fast_kernels, fast_kernels_enabled, reference_kernels
from ghnviz.graph.build import build_graph
from ghnviz.zoo.deepnets1m.genotypes import Genotype
from ghnviz.zoo.deepnets1m.net import Network


def _grads(out: torch.Tensor, inputs) -> list[torch.Tensor]:
    torch.manual_seed(5)
    return torch.autograd.grad(out, inputs, torch.randn(out.shape))  # same values whatever the strides


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize(
    'size, k, d, stride, padding, groups',
    [
        (32, 3, 2, 1, 2, 'dw'),  # dil_conv_3x3
        (16, 5, 2, 1, 4, 'dw'),  # dil_conv_5x5
        (32, 3, 2, 2, 2, 'dw'),  # reduction cell: stride = dilation
        (15, 5, 2, 2, 4, 'dw'),  # odd size
        (7, 3, 3, 1, 1, 1),  # dense conv, padding not a multiple of the dilation
        (9, 3, 3, 3, 0, 2),  # grouped, no padding, stride 3 = dilation
        (1, 5, 2, 1, 4, 'dw'),  # 1x1 feature map: only the centre tap sees data
        (5, 3, 2, 2, 0, 'dw'),  # output 1x1
    ],
)
def test_dilated_conv_matches_the_dilated_kernel(size, k, d, stride, padding, groups, channels_last):
    torch.manual_seed(0)
    c = 6
    g = c if groups == 'dw' else groups
    x = torch.randn(3, c, size, size + 1)  # (B, C, H, W), W != H
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(c, c // g, k, k, requires_grad=True)
    ref = F.conv2d(x, w, None, stride, padding, d, g)
    ours = dilated_conv2d(x, w, stride, padding, d, g)
    assert ours is not None and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(ours, (x, w)), _grads(ref, (x, w))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    'stride, padding, dilation',
    [(1, 1, 1), (3, 2, 2), ((1, 2), 2, 2), (1, (2, 1), 2), (1, 2, (2, 1)), (1, 'same', 2)],
)
def test_dilated_conv_declines_what_it_does_not_handle(stride, padding, dilation):
    x, w = torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3)
    assert dilated_conv2d(x, w, stride, padding, dilation, 4) is None


def test_attention_matches_einsum_softmax_forward_and_backward():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 17, 4, requires_grad=True) for _ in range(3))  # (B, heads, N, d)
    with reference_kernels():
        ref = attention(q, k, v, 0.5)
    with fast_kernels():
        ours = attention(q, k, v, 0.5)
    expected = torch.einsum('bhij,bhjd->bhid', (torch.einsum('bhid,bhjd->bhij', q, k) * 0.5).softmax(-1), v)
    torch.testing.assert_close(ref, expected)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(ours, (q, k, v)), _grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert ours.grad_fn.name() != ref.grad_fn.name()  # really a different kernel


@pytest.mark.parametrize('mode', ['autocast', 'bf16 tensors'])
def test_attention_in_bf16_runs_the_fused_kernel_in_fp32_and_returns_bf16(mode):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if mode == 'bf16 tensors' else torch.float32
    q, k, v = (torch.randn(2, 8, 17, 4, dtype=dtype, requires_grad=True) for _ in range(3))
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=mode == 'autocast'):
        with reference_kernels():
            ref = attention(q, k, v, 0.5)
        with fast_kernels():
            ours = attention(q, k, v, 0.5)
    assert ref.dtype == ours.dtype == torch.bfloat16  # what the einsums give under bf16
    exact = attention(q.double(), k.double(), v.double(), 0.5)
    # computed in fp32, the fast result is closer to the exact one than bf16 rounding allows for
    torch.testing.assert_close(ours.double(), exact, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ref.double(), exact, rtol=3e-2, atol=3e-2)
    assert ours.grad_fn.name() == 'ToCopyBackward0'  # the cast back from the fp32 fused kernel
    for a, b in zip(_grads(ours.float(), (q, k, v)), _grads(ref.float(), (q, k, v))):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize('mode', ['autocast', 'bf16 tensors'])
def test_dilated_conv_in_bf16_keeps_the_plain_kernel_for_5x5_stride_1(mode):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if mode == 'bf16 tensors' else torch.float32
    x = torch.randn(2, 6, 16, 16, dtype=dtype)
    w5, w3 = torch.randn(6, 1, 5, 5, dtype=dtype), torch.randn(6, 1, 3, 3, dtype=dtype)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=mode == 'autocast'):
        assert dilated_conv2d(x, w5, 1, 4, 2, 6) is None
        for w, stride, pad in ((w5, 2, 4), (w3, 1, 2), (w3, 2, 2)):  # still the fast form
            ours = dilated_conv2d(x, w, stride, pad, 2, 6)
            ref = F.conv2d(x, w, None, stride, pad, 2, 6)
            assert ours is not None and ours.dtype == ref.dtype == torch.bfloat16
            torch.testing.assert_close(ours.float(), ref.float(), rtol=2e-2, atol=5e-2)
    assert dilated_conv2d(x.float(), w5.float(), 1, 4, 2, 6) is not None  # fp32: the fast form


def test_fast_kernels_are_scoped():
    assert not fast_kernels_enabled()
    with fast_kernels():
        assert fast_kernels_enabled()
        with reference_kernels():
            assert not fast_kernels_enabled()
        assert fast_kernels_enabled()
    assert not fast_kernels_enabled()


def _dil_msa_network() -> Network:
    """A small DeepNets-1M network whose cells hold both sped-up ops (a dilated conv in each cell kind)."""
    genotype = Genotype(
        normal=[('dil_conv_3x3', 0), ('msa', 1), ('dil_conv_5x5', 2), ('sep_conv_3x3', 0)],
        normal_concat=[2, 3],
        reduce=[('dil_conv_5x5', 0), ('dil_conv_3x3', 1), ('msa', 2), ('max_pool_3x3', 1)],
        reduce_concat=[2, 3],
    )
    torch.manual_seed(0)
    return Network(16, 10, genotype, n_cells=3, is_imagenet_input=False, is_vit=False, norm='bn')


def test_network_output_and_gradients_agree():
    model = _dil_msa_network().train()
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32)  # (B, 3, H, W)
    params = [p for p in model.parameters()]
    ref = model(x)
    with fast_kernels():
        ours = model(x)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(_grads(ours, params), _grads(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize('shape_only', [True, False])
def test_graph_built_inside_fast_kernels_keeps_the_reference_ops(shape_only):
    model = _dil_msa_network().eval()
    reference = build_graph(model, input_size=(3, 32, 32), fast=shape_only)
    with fast_kernels():
        inside = build_graph(model, input_size=(3, 32, 32), fast=shape_only)
    ops = [n.op for n in reference.nodes]
    assert ops.count('msa') == 3 and ops.count('dil_conv') == 6  # two per cell
    assert [(n.name, n.op) for n in inside.nodes] == [(n.name, n.op) for n in reference.nodes]
    np.testing.assert_array_equal(inside.adj, reference.adj)
