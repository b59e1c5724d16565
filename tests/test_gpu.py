"""Devices and precision: CUDA predictions equal CPU ones; autocast changes the GHN forward only slightly.

The CUDA tests are marked ``gpu`` and skipped without CUDA. The CPU autocast test runs everywhere.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import shared_file

import ghnviz

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
# relative l2 error of a predicted tensor under autocast, by dtype (measured: bf16 < 5e-3, fp16 < 1e-3)
AUTOCAST_TOL = {'bf16': 2e-2, 'fp16': 5e-3}


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def ghn_file():
    return shared_file('conformance', 'ghn3_tiny_random.joblib')


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return ghnviz.create_model(name)


def _predict(ghn, model: nn.Module, **kwargs):
    gen = torch.Generator().manual_seed(
        0
    )  # a CPU generator: the ViT class-token row is the same on every device
    return ghn.predict(model, generator=gen, **kwargs)


def _rel_errors(pred, model: nn.Module, reference: nn.Module) -> dict[str, float]:
    ref = dict(reference.named_parameters())
    out = {}
    for n, p in model.named_parameters():
        if n in pred.predicted:
            want = ref[n].detach().double().cpu()
            out[n] = ((p.detach().double().cpu() - want).norm() / want.norm().clamp_min(1e-12)).item()
    return out


@pytest.mark.parametrize('autocast', ['bf16', 'fp16'])
def test_autocast_on_cpu(ghn_file, autocast):
    ghn = ghnviz.load_ghn(ghn_file)
    ref, model = _model('resnet18'), _model('resnet18')
    _predict(ghn, ref)
    pred = _predict(ghn, model, autocast=autocast)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    errors = _rel_errors(pred, model, ref)
    assert len(errors) == 62 and max(errors.values()) < AUTOCAST_TOL[autocast]
    with pytest.raises(ValueError, match='bf16'):
        ghn.predict(model, autocast='int8')


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize('name', ['resnet18', 'vit_b_16', 'convnext_tiny'])
def test_cuda_matches_cpu(ghn_file, name):
    cpu_ghn = ghnviz.load_ghn(ghn_file)
    gpu_ghn = ghnviz.load_ghn(ghn_file, device='cuda')
    assert gpu_ghn.device.type == 'cuda'
    ref = _model(name)
    ref_pred = _predict(cpu_ghn, ref, complete=True)

    model = _model(name).cuda()  # graph traced on the GPU, parameters written there
    pred = _predict(gpu_ghn, model, complete=True)
    assert pred.predicted == ref_pred.predicted and pred.filled == ref_pred.filled and pred.complete
    assert all(p.device.type == 'cuda' for p in model.parameters())
    errors = _rel_errors(pred, model, ref)
    assert max(errors.values()) < 1e-4, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():  # filled values do not depend on the device
        if n in pred.filled:
            assert torch.equal(p.detach().cpu(), ref_params[n].detach()), n


@cuda
@pytest.mark.gpu
def test_cuda_ghn_cpu_model(ghn_file):
    """A GHN on the GPU predicting into a model kept on the CPU (and the other way round)."""
    cpu_ghn = ghnviz.load_ghn(ghn_file)
    gpu_ghn = ghnviz.load_ghn(ghn_file, device='auto')
    assert gpu_ghn.device.type == 'cuda'
    ref, model = _model('resnet18'), _model('resnet18')
    _predict(cpu_ghn, ref)
    pred = _predict(gpu_ghn, model)
    assert all(p.device.type == 'cpu' for p in model.parameters())
    assert max(_rel_errors(pred, model, ref).values()) < 1e-4

    model = _model('resnet18').cuda()
    pred = _predict(cpu_ghn, model)
    assert max(_rel_errors(pred, model, ref).values()) < 1e-4


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize('autocast', ['bf16', 'fp16'])
def test_cuda_autocast(ghn_file, autocast):
    ghn = ghnviz.load_ghn(ghn_file, device='cuda')
    ref = _model('vit_b_16').cuda()
    _predict(ghn, ref)
    model = _model('vit_b_16').cuda()
    pred = _predict(ghn, model, autocast=autocast)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert max(_rel_errors(pred, model, ref).values()) < AUTOCAST_TOL[autocast]


@cuda
@pytest.mark.gpu
def test_cuda_gradients_reach_the_ghn(ghn_file):
    ghn = ghnviz.load_ghn(ghn_file, device='cuda').train()
    model = _model('resnet18').cuda()
    pred = ghn.predict_differentiable(model)
    out = pred.model(torch.randn(2, 3, 64, 64, device='cuda'))
    out.square().mean().backward()
    grads = [p.grad for p in ghn.parameters() if p.grad is not None]
    assert grads and all(g.device.type == 'cuda' for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
