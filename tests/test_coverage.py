"""``predict(complete=True)``: tensors without a graph node are filled by labelled rules, nothing silently.

The models are the cheap ones among the torchvision classifiers the GHN graph does not fully cover
(layer scales, relative position bias tables, logit scales, class tokens); see ``docs/coverage.md``
for all 80.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import shared_file

import ghnviz
from ghnviz.hyper.extras import FILL_RULES, FillConfig, fill_missing

# model -> (fill rule expected for its unpredicted tensors, how many tensors)
FORMERLY_INCOMPLETE = {
    'convnext_tiny': ('layer_scale', 18),
    'swin_t': ('relative_position_bias', 12),
    'swin_v2_t': ('logit_scale', 12),
    'maxvit_t': ('relative_position_bias', 22),
    'vit_b_32': ('token', 1),
}


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def ghn():
    return ghnviz.load_ghn(shared_file('conformance', 'ghn3_tiny_random.joblib'))


def _values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize('name', list(FORMERLY_INCOMPLETE))
def test_complete_prediction(ghn, name):
    rule, count = FORMERLY_INCOMPLETE[name]
    torch.manual_seed(0)
    model = ghnviz.create_model(name)
    gen = torch.Generator().manual_seed(0)  # the ViT class-token row, so both calls write the same values
    plain = ghn.predict(model, generator=gen)
    plain_values = _values(model)
    assert len(plain.skipped) == count and not plain.filled and 'fill' not in plain.seconds

    gen.manual_seed(0)
    full = ghn.predict(model, generator=gen, complete=True)
    names = [n for n, _ in model.named_parameters()]
    assert full.complete and full.skipped == {}
    assert full.predicted == plain.predicted  # the GHN-predicted set is the conformance set
    assert set(full.filled) == set(plain.skipped)  # what was skipped is now filled ...
    assert not set(full.filled) & set(full.predicted)  # ... and kept apart from the predictions
    assert set(full.predicted) | set(full.filled) == set(names)
    assert all(label.startswith(rule + ': ') for label in full.filled.values()), full.filled
    assert full.seconds['fill'] <= full.seconds['total']

    values = _values(model)
    for n in full.predicted:  # filling does not touch predicted tensors
        assert torch.equal(values[n], plain_values[n]), n
    filled = torch.cat([values[n].flatten() for n in full.filled])
    if rule == 'layer_scale':
        assert torch.all(filled == torch.tensor(1e-6))
    elif rule == 'logit_scale':
        assert torch.allclose(filled, torch.tensor(math.log(10.0)))
    elif rule == 'relative_position_bias':
        assert 0.01 < filled.std() < 0.03 and filled.abs().max() <= 0.04 + 1e-6  # truncated at 2 std
    else:
        assert filled.abs().max() < 0.2 and filled.std() > 0.005

    counts = full.counts()
    assert counts['tensors_predicted'] + counts['tensors_filled'] == counts['tensors_total'] == len(names)
    assert counts['params_predicted'] + counts['params_filled'] == counts['params_total']
    assert counts['tensors_filled'] == count and counts['tensors_skipped'] == 0


def test_fills_are_reproducible_and_leave_the_global_rng_alone(ghn):
    torch.manual_seed(0)
    model = ghnviz.create_model('swin_t')
    ghn.predict(model, complete=True)
    first = _values(model)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    pred = ghn.predict(model, complete=True)
    assert torch.equal(torch.random.get_rng_state(), state)
    for n in pred.filled:
        assert torch.equal(first[n], dict(model.named_parameters())[n]), n
    ghn.predict(model, fill=FillConfig(seed=1))  # another seed, other values
    table = next(iter(pred.filled))
    assert not torch.equal(first[table], dict(model.named_parameters())[table])


class Mixed(nn.Module):
    """Layers a GHN predicts, layers it cannot represent (Conv1d, LSTM) and a GroupNorm (no node)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.conv1d = nn.Conv1d(16, 16, 3, padding=1)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.gn(self.conv(x)))  # (B, 16, H, W)
        x = F.adaptive_avg_pool2d(x, 4).flatten(2)  # (B, 16, 16)
        x = self.conv1d(x).transpose(1, 2)  # (B, 16, 16)
        x, _ = self.lstm(x)
        return self.fc(x[:, -1])


def test_unsupported_layers_stay_skipped(ghn):
    torch.manual_seed(0)
    model = Mixed()
    with torch.no_grad():
        model.gn.weight.fill_(3.0)
    pred = ghn.predict(model, complete=True)
    assert set(pred.predicted) == {'conv.weight', 'conv.bias', 'fc.weight', 'fc.bias'}
    assert set(pred.filled) == {'gn.weight', 'gn.bias'}
    assert all(v.startswith('norm_affine: ') for v in pred.filled.values())
    assert torch.all(model.gn.weight == 1) and torch.all(model.gn.bias == 0)
    lstm = {n for n, _ in model.lstm.named_parameters(prefix='lstm')}
    conv1d = {'conv1d.weight', 'conv1d.bias'}
    assert set(pred.skipped) == lstm | conv1d and not pred.complete
    assert all('LSTM' in pred.skipped[n] for n in lstm)
    assert all('Conv1d' in pred.skipped[n] for n in conv1d)

    # the opt-in last resort: the owning module's own initialisation, labelled as such
    before = _values(model)
    pred = ghn.predict(model, fill=FillConfig(module_init=True))
    assert pred.complete
    assert {n for n, v in pred.filled.items() if v.startswith('module_init: LSTM.')} == lstm
    assert {n for n, v in pred.filled.items() if v.startswith('module_init: Conv1d.')} == conv1d
    assert not torch.equal(model.lstm.weight_ih_l0, before['lstm.weight_ih_l0'])
    assert torch.equal(model.conv.weight, before['conv.weight'])  # predicted again, identical


def test_kept_classifier_is_not_filled(ghn):
    torch.manual_seed(0)
    model = ghnviz.create_model('swin_t', num_classes=10)
    head = model.head.weight.detach().clone()
    pred = ghn.predict(model, predict_class_layers=False, complete=True)
    assert set(pred.skipped) == {'head.weight', 'head.bias'}
    assert 'predict_class_layers=False' in pred.skipped['head.weight']
    assert torch.equal(model.head.weight, head)
    assert len(pred.filled) == 12


class TimmStyle(nn.Module):
    """Parameter names of timm-style blocks: tokens, position embedding, layer/residual scales."""

    def __init__(self, dim=32):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.cls_token = nn.Parameter(torch.full((1, 1, dim), 5.0))
        self.reg_token = nn.Parameter(torch.full((1, 4, dim), 5.0))
        self.pos_embed = nn.Parameter(torch.full((1, 21, dim), 5.0))
        self.norm = nn.LayerNorm(dim)
        self.ls1 = nn.Module()
        self.ls1.gamma = nn.Parameter(torch.full((dim,), 5.0))
        self.res_scale1 = nn.Module()
        self.res_scale1.scale = nn.Parameter(torch.full((dim,), 5.0))
        self.gamma = nn.Parameter(torch.full((dim, dim), 5.0))  # not per-channel: no layer-scale rule
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, 16, dim)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), self.reg_token.expand(len(x), -1, -1), x], 1)
        x = x + self.pos_embed  # (B, 21, dim)
        x = x * self.res_scale1.scale + self.ls1.gamma * self.norm(x) @ self.gamma
        return self.head(x[:, 0])


def test_rules_by_name(ghn):
    model = TimmStyle()
    model.expected_input_sz = (3, 32, 32)
    pred = ghn.predict(model, complete=True)
    assert set(pred.predicted) == {f'{m}.{a}' for m in ('patch', 'norm', 'head') for a in ('weight', 'bias')}
    assert list(pred.skipped) == ['gamma'] and 'TimmStyle.gamma' in pred.skipped['gamma']
    rules = {n: v.split(':')[0] for n, v in pred.filled.items()}
    assert rules == {
        'cls_token': 'token',
        'reg_token': 'token',
        'pos_embed': 'position_embedding',
        'ls1.gamma': 'layer_scale',
        'res_scale1.scale': 'res_scale',
    }
    assert torch.all(model.ls1.gamma == 1e-6) and torch.all(model.res_scale1.scale == 1.0)
    assert model.cls_token.abs().max() < 0.2 and model.pos_embed.abs().max() <= 0.04 + 1e-6
    assert torch.all(model.gamma == 5.0)  # no rule matched: left as it was, and listed as skipped
    assert fill_missing(model, ['gamma', 'ls1.gamma']) == {'ls1.gamma': pred.filled['ls1.gamma']}
    assert {r.name for r in FILL_RULES} >= {'layer_scale', 'token', 'relative_position_bias', 'norm_affine'}
