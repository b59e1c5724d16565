"""ghnviz.stats: per-tensor weight statistics, reference-init columns, comparisons."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from torch import nn

from ghnviz.stats import (
    STAT_COLUMNS,
    compare_stats,
    model_summary_stats,
    reference_init_tensors,
    tensor_stats,
    weight_stats,
)

pytestmark = pytest.mark.usefixtures('one_thread')


def _linear(weight: list[list[float]]) -> nn.Linear:
    w = torch.tensor(weight)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def test_hand_computed_3x2():
    # W = [[3, 0], [0, 4], [0, 0]]: values 3, 0, 0, 4, 0, 0; singular values 4 and 3
    df = weight_stats(nn.Sequential(_linear([[3, 0], [0, 4], [0, 0]])), reference_init=False)
    row = df.iloc[0]
    assert (row['name'], row['module_type'], row['shape'], row['numel']) == ('0.weight', 'Linear', (3, 2), 6)
    assert row['mean'] == pytest.approx(7 / 6)
    assert row['std'] == pytest.approx(math.sqrt((25 - 49 / 6) / 5))  # unbiased
    assert (row['min'], row['max']) == (0, 4)
    assert row['norm'] == pytest.approx(5)
    assert row['near_zero'] == pytest.approx(4 / 6)
    assert row['sv_max'] == pytest.approx(4) and row['sv_min'] == pytest.approx(3)
    assert row['cond'] == pytest.approx(4 / 3)
    p = np.array([4 / 7, 3 / 7])
    assert row['eff_rank'] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    # rows (3, 0) and (0, 4) are perfectly anti-correlated; the constant row (0, 0) is left out
    assert row['diversity'] == pytest.approx(1.0)
    assert row['n_nonfinite'] == 0


def test_hand_computed_diversity_and_ranks():
    # rows: (1,2,3), (3,2,1) -> corr -1; (1,0,1) is uncorrelated with both -> |corr| mean = 2/6
    df = tensor_stats([torch.tensor([[1.0, 2, 3], [3, 2, 1], [1, 0, 1]])])
    assert df.loc[0, 'diversity'] == pytest.approx(1 / 3)
    eye = tensor_stats([torch.eye(5), torch.ones(4, 6)])
    assert eye.loc[0, 'eff_rank'] == pytest.approx(5) and eye.loc[0, 'cond'] == pytest.approx(1)
    assert eye.loc[1, 'eff_rank'] == pytest.approx(1)  # rank one
    assert eye.loc[1, 'cond'] == math.inf and eye.loc[1, 'sv_max'] == pytest.approx(math.sqrt(24))
    assert math.isnan(eye.loc[1, 'diversity'])  # all rows constant
    w = torch.tensor([[1.0, 2, 3], [3, 2, 1], [1, 0, 1], [0.1, 0.1, 0.1]])  # + a constant row, not 0
    assert tensor_stats([w]).loc[0, 'diversity'] == pytest.approx(1 / 3)  # the constant row is left out
    vec = tensor_stats([torch.tensor([1.0, -1.0])])
    assert vec.loc[0, 'std'] == pytest.approx(math.sqrt(2)) and math.isnan(vec.loc[0, 'sv_max'])


def test_gram_matches_svdvals_including_ill_conditioned():
    torch.manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(200, 64, dtype=torch.float64))
    s = torch.logspace(0, -4, 64, dtype=torch.float64)  # condition number 1e4
    ill = (q1 * s) @ q2.t()  # (64, 200)
    tensors = [torch.randn(32, 16, 3, 3), torch.randn(100, 40), ill.float(), torch.randn(7, 7)]
    gram, svd = tensor_stats(tensors, sv_method='gram'), tensor_stats(tensors, sv_method='svdvals')
    for col in ('sv_max', 'sv_min', 'eff_rank', 'cond'):
        np.testing.assert_allclose(gram[col], svd[col], rtol=2e-3, err_msg=col)
    # 'gram' derives diversity from the shared centred Gram matrix, 'svdvals' computes it apart
    np.testing.assert_allclose(gram['diversity'], svd['diversity'], rtol=1e-5)
    exact = torch.linalg.svdvals(ill.float().double())  # the stored float32 matrix, in float64
    assert gram.loc[2, 'cond'] == pytest.approx((exact[0] / exact[-1]).item(), rel=1e-4)
    with pytest.raises(ValueError, match='gram'):
        tensor_stats(tensors, sv_method='lapack')


def test_resnet18_rows_and_reference_init():
    model = torchvision.models.resnet18()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.random.get_rng_state()
    df = weight_stats(model)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # not mutated
    assert df['name'].tolist() == list(before)
    assert int(df['numel'].sum()) == sum(p.numel() for p in before.values())
    for c in STAT_COLUMNS:
        assert f'init_{c}' in df
    conv = df[df['module_type'] == 'Conv2d']
    assert conv[['sv_max', 'eff_rank', 'cond', 'diversity', 'init_std', 'init_diversity']].notna().all().all()
    # nn.Conv2d.reset_parameters: kaiming_uniform(a=sqrt(5)) -> U(-b, b), b = 1/sqrt(fan_in); std b/sqrt(3)
    fan_in = conv['shape'].map(lambda s: math.prod(s[1:])).astype(float)
    np.testing.assert_allclose(conv['init_std'], 1 / np.sqrt(3 * fan_in), rtol=0.15)
    bn_w = df[(df['module_type'] == 'BatchNorm2d') & (df['param'] == 'weight')]
    assert (bn_w['init_mean'] == 1).all() and (bn_w['init_std'] == 0).all()
    # random filters are nearly uncorrelated
    assert conv['diversity'].max() < 0.3 and conv['init_diversity'].max() < 0.3
    again = weight_stats(model)
    pd.testing.assert_frame_equal(df, again)


def test_reference_init_shares_draws_between_identical_layers():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 4))
    ref = reference_init_tensors(model, seed=0)
    assert ref['0.weight'] is ref['2.weight'] and ref['0.weight'] is not ref['3.weight']
    assert not torch.equal(ref['0.weight'], model[0].weight)


def test_tiled_weights_lack_diversity():
    torch.manual_seed(0)
    base = torch.randn(8, 64)
    tiled = base.repeat(16, 1)  # (128, 64): each filter repeated 16 times, as channel tiling does
    df = tensor_stats([torch.randn(128, 64), tiled + 1e-3 * torch.randn(128, 64)])
    assert df.loc[0, 'diversity'] < 0.15
    assert df.loc[1, 'diversity'] > 0.15 and df.loc[1, 'eff_rank'] < 9


def test_row_subsample_estimate():
    torch.manual_seed(0)
    w = torch.randn(2048, 64) + 0.3 * torch.randn(1, 64)  # correlated filters
    full = tensor_stats([w], max_rows=4096).loc[0, 'diversity']
    sub = tensor_stats([w], max_rows=512).loc[0, 'diversity']
    assert sub == pytest.approx(full, rel=0.03)


def test_non_finite_values():
    w = torch.randn(6, 5)
    w[0, 0], w[1, 1] = float('nan'), float('inf')
    df = tensor_stats([w, torch.randn(6, 5)])
    assert df.loc[0, 'n_nonfinite'] == 2 and math.isnan(df.loc[0, 'sv_max'])
    assert df.loc[1, 'n_nonfinite'] == 0 and df.loc[1, 'sv_max'] > 0


def test_compare_and_summary():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 4))
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[0].weight.mul_(2)
    cmp = compare_stats(a, b)
    row = cmp.set_index('name').loc['0.weight']
    assert row['d_norm'] == pytest.approx(row['norm_a'])
    assert row['d_std'] == pytest.approx(row['std_a'], rel=1e-5)
    assert row['d_diversity'] == pytest.approx(0, abs=1e-6) and row['d_eff_rank'] == pytest.approx(
        0, abs=1e-4
    )
    assert row['change_norm'] == pytest.approx(row['norm_a'], rel=1e-6)
    assert row['rel_change'] == pytest.approx(1) and row['cosine'] == pytest.approx(1)
    untouched = cmp.set_index('name').loc['3.weight']
    assert untouched['change_norm'] == 0 and untouched['d_mean'] == 0
    from_frames = compare_stats(weight_stats(a, reference_init=False), weight_stats(b, reference_init=False))
    np.testing.assert_allclose(from_frames['d_norm'], cmp['d_norm'])
    assert 'change_norm' not in from_frames

    df = weight_stats(a)
    summary = model_summary_stats(df)
    params = torch.cat([p.detach().flatten() for p in a.parameters()])
    assert summary['n_params'] == params.numel() and summary['n_tensors'] == 6
    assert summary['global_norm'] == pytest.approx(params.norm().item(), rel=1e-6)
    assert {'diversity', 'init_diversity', 'eff_rank_ratio', 'std_ratio_median'} <= set(summary.index)
    assert 0 < summary['eff_rank_ratio'] <= 1
