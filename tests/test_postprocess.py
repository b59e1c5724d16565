"""ghnviz.postprocess: orthogonalisation and noise of predicted parameters."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from ghnviz.postprocess import PRESETS, corr_std, orthogonalize, postprocess, weight_to_tall

pytestmark = pytest.mark.usefixtures('one_thread')


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3),  # 1: wide (16, 27)
        nn.BatchNorm2d(16),
        nn.Conv2d(16, 64, 1),  # 2: tall (64, 16)
        nn.Conv2d(64, 32, 3),  # 3: wide (32, 576)
        nn.Flatten(),
        nn.Linear(32, 48),  # 4: tall (48, 32)
        nn.Linear(48, 10),  # 5: classifier
    )


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_orthogonal_on_the_tall_axis_and_shapes_kept():
    model = torchvision.models.resnet18()
    before = _weights(model)
    res = postprocess(model, orth=True, seed=0)
    changed = res.changed()
    assert len(changed) == 20  # 21 conv/linear layers, the classifier excluded
    for name, module in model.named_modules():
        if name not in changed:
            continue
        w = module.weight.detach()
        assert w.shape == before[f'{name}.weight'].shape
        tall, wide = weight_to_tall(w)
        eye = torch.eye(tall.shape[1])
        torch.testing.assert_close(tall.t() @ tall, eye, atol=2e-5, rtol=0)  # orthonormal columns
        if wide:  # rows of the (out, rest) matrix are orthonormal
            mat = w.reshape(w.shape[0], -1)
            torch.testing.assert_close(mat @ mat.t(), torch.eye(w.shape[0]), atol=2e-5, rtol=0)
        # sign fix: Q = tall @ R^-1 with diag(R) > 0, so each column has a positive dot with its source
        src = weight_to_tall(before[f'{name}.weight'])[0]
        assert bool(((src * tall).sum(0) > 0).all())


@pytest.mark.slow
def test_classifier_and_early_layers_untouched_resnet50_preset():
    model = torchvision.models.resnet50()
    before = _weights(model)
    res = postprocess(model, preset='resnet50', seed=1, exact=False)
    frame = res.frame()
    assert len(frame) == 54 and frame['index'].tolist() == list(range(1, 55))
    assert frame.loc[frame['index'] == 37, 'name'].item() == 'layer3.3.conv3'
    assert res.changed() == frame.loc[(frame['index'] >= 37) & (frame['index'] < 54), 'name'].tolist()
    assert frame.iloc[-1]['action'] == 'skipped (classifier)'
    changed = set(res.changed())
    for name, p in model.named_parameters():
        module = name.rpartition('.')[0]
        if module in changed and name.endswith('weight'):
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name  # biases, norms, layers < 37, fc
    assert (frame.loc[frame['name'].isin(changed), 'noise_std'] > 0).all()
    assert (frame.loc[frame['name'].isin(changed), 'change_norm'] > 0).all()


def test_noise_scale_matches_beta_times_corr_std():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 4096), nn.Linear(4096, 10))
    w0 = model[0].weight.detach().clone()  # (4096, 256): already tall
    beta = 0.1
    expected = beta * torch.corrcoef(w0).flatten().std().item()
    res = postprocess(model, orth=False, beta=beta, seed=3)
    diff = model[0].weight.detach() - w0
    assert res.records[0].noise_std == pytest.approx(expected, rel=1e-6)
    assert diff.std().item() == pytest.approx(expected, rel=1e-2)  # 1M samples
    assert abs(diff.mean().item()) < 5 * expected / 1000
    assert res.records[0].change_norm == pytest.approx(diff.norm().item(), rel=1e-5)


def test_noise_only_in_max_sz_block():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 200), nn.Linear(200, 100), nn.Linear(100, 100), nn.Linear(100, 5))
    before = _weights(model)
    res = postprocess(model, orth=False, beta=0.5, max_sz=150, seed=0)
    assert [r.action for r in res.records] == [
        'noise',
        'noise',
        'skipped (max(out, in) <= max_sz=150)',
        'skipped (classifier)',
    ]
    w, w0 = model[0].weight.detach(), before['0.weight']
    assert torch.equal(w[:150], w0[:150]) and torch.equal(w[:, :150], w0[:, :150])
    assert bool((w[150:, 150:] != w0[150:, 150:]).all())
    assert torch.equal(model[2].weight, before['2.weight'])
    assert torch.equal(model[3].weight, before['3.weight'])


def test_matches_published_recipe_bitwise():
    """The transform written out step by step (global RNG, per-layer loop) gives the same tensors."""
    kw = dict(beta=0.01, layer=2, max_sz=0)
    model, ref = _small_net(), _small_net()
    postprocess(model, orth=True, seed=7, **kw)

    layers = [m for m in ref.modules() if getattr(m, 'weight', None) is not None and m.weight.dim() >= 2]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        for i, m in enumerate(layers, start=1):
            if i == len(layers) or i < kw['layer']:
                continue
            w = m.weight.data
            mat = w.reshape(w.shape[0], -1)
            tall = mat.t() if mat.shape[0] < mat.shape[1] else mat
            w += kw['beta'] * torch.corrcoef(tall).flatten().std() * torch.randn_like(w)
            mat = w.reshape(w.shape[0], -1)
            transposed = mat.shape[0] < mat.shape[1]
            q, r = torch.linalg.qr(mat.t() if transposed else mat)
            q = q * torch.diag(r).sign()
            m.weight.data = (q.t() if transposed else q).reshape(w.shape)
    for (n, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, p_ref), n


def test_orthogonalize_batch_equals_single():
    ws = torch.randn(4, 8, 3, 3, 3)
    single = torch.stack([orthogonalize(w) for w in ws])
    from ghnviz.postprocess import orthogonalize_batch

    assert torch.equal(orthogonalize_batch(ws), single)


def test_seeded_and_global_rng_untouched():
    base = _small_net()
    runs = []
    for seed in (5, 5, 6):
        m = copy.deepcopy(base)
        state = torch.random.get_rng_state()
        postprocess(m, orth=False, beta=1e-2, seed=seed)
        assert torch.equal(torch.random.get_rng_state(), state)
        runs.append(_weights(m))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])
    m = copy.deepcopy(base)
    postprocess(m, orth=False, beta=1e-2, seed=torch.Generator().manual_seed(5))
    assert all(torch.equal(p, runs[0][n]) for n, p in m.named_parameters())


def test_not_inplace_returns_copy():
    model = _small_net()
    before = _weights(model)
    res = postprocess(model, orth=True, beta=1e-3, seed=0, inplace=False)
    assert res.model is not model
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not torch.equal(res.model[0].weight, before['0.weight'])


def test_fast_corr_std_close_and_constant_rows():
    torch.manual_seed(0)
    for shape in [(64, 3, 3, 3), (128, 32), (10, 300), (5, 5)]:
        w = torch.randn(shape)
        assert corr_std(w, exact=False).item() == pytest.approx(corr_std(w).item(), rel=1e-5)
    w = torch.randn(40, 10)
    w[:, 3] = 0.5  # a constant row of the tall (40, 10)... its transpose is tall here
    w2 = torch.randn(10, 40)
    w2[:, 2] = 1.0  # tall (40, 10) has a constant row 2
    for x in (w, w2):
        exact, fast = corr_std(x), corr_std(x, exact=False)
        assert torch.isfinite(exact) and exact.item() == pytest.approx(fast.item(), rel=1e-5)


def test_presets_and_errors():
    assert PRESETS['resnet50'] == dict(orth=True, beta=3e-5, layer=37)
    assert PRESETS['convnext'] == dict(orth=True, beta=3e-5, layer=94)
    with pytest.raises(ValueError, match='resnet50'):
        postprocess(_small_net(), preset='nope')
    res = postprocess(_small_net(), orth=False, beta=0.0)
    assert res.changed() == []
