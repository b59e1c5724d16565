"""Fine-tuning: real short runs on offline CIFAR-10 (default and GHN inits), the schedule, the config."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import shared_file

from ghnviz.finetune import INITS, FinetuneConfig, build_model, finetune, initialise, lr_factor
from ghnviz.runs import RunStore

MODEL = 'shufflenet_v2_x0_5'  # adapted to 32x32, 0.35 M parameters: a step takes a fraction of a second


def _config(**kw) -> FinetuneConfig:
    base = dict(
        model=MODEL,
        data_path=str(shared_file('data', 'cifar10-jpeg.tar.xz')),
        shots=10,  # 100 training images
        steps=6,
        batch_size=32,
        eval_every=3,
        eval_limit=100,
        eval_batch_size=100,
    )
    return FinetuneConfig(**(base | kw))


@pytest.mark.slow
def test_default_init_run_logs_every_step_and_ends_done(tmp_path):
    store = RunStore(tmp_path / 'runs.sqlite')
    rng_before = torch.get_rng_state()
    result = finetune(_config(), store=store, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone

    assert result.status == 'done' and result.steps == 6
    run = store.get_run(result.run_id)
    assert run.status == 'done' and run.error is None and run.pid is not None
    assert run.config['kind'] == 'finetune' and run.config['model'] == MODEL
    assert run.summary['steps'] == 6 and run.summary['metrics']['test/acc'] == result.metrics['test/acc']

    wide = store.metrics_frame(result.run_id, wide=True).set_index('step')
    assert wide['train/loss'].dropna().index.tolist() == [1, 2, 3, 4, 5, 6]
    assert wide['test/acc'].dropna().index.tolist() == [0, 3, 6]  # start, every 3 steps, end
    assert wide['train/loss'].dropna().between(0.5, 5.0).all()  # cross-entropy of 10 classes near ln 10
    assert wide['test/acc'].dropna().between(0, 100).all()
    # warm-up round(0.05 * 6) = 0 steps, then cosine: the lr used at step s is lr * factor(s - 1)
    expected = [0.01 * lr_factor(s, 6, 0) for s in range(6)]
    assert wide['lr'].dropna().tolist() == pytest.approx(expected)
    assert [h['step'] for h in result.history] == [0, 3, 6]
    assert result.metrics['test/acc'] == wide.loc[6, 'test/acc']
    assert not result.model.training  # handed back in eval mode
    messages = [e['message'] for e in store.events(result.run_id)]
    assert messages[0].startswith('data: cifar10, 100 training and 100 test images')
    store.close()


@pytest.mark.slow
def test_ghn_orth_noise_init_run(tmp_path):
    ghn = shared_file('conformance', 'ghn2_cifar10_random.pt')
    store = RunStore(tmp_path / 'runs.sqlite')
    result = finetune(
        _config(init='ghn+orth+noise', ghn=str(ghn), steps=4, eval_every=0), store=store, progress=False
    )
    assert result.status == 'done' and store.get_run(result.run_id).status == 'done'
    init = result.init
    assert init['class_layers_predicted'] is True and init['ghn_num_classes'] == 10
    assert (
        init['predicted'] > 0 and init['beta'] == 3e-5 and init['orth'] is True and init['postprocessed'] > 0
    )
    frame = store.metrics_frame(result.run_id, wide=True)
    assert frame['train/loss'].notna().sum() == 4 and frame['test/acc'].notna().sum() == 2
    assert all(math.isfinite(v) for v in frame['train/loss'].dropna())
    store.close()


def test_ghn_for_other_classes_keeps_the_default_classifier():
    """A 1000-class GHN on a 10-class task: everything but the classifier is predicted."""
    ghn = str(shared_file('conformance', 'ghn2_imagenet_random.pt'))
    torch.manual_seed(0)
    model = build_model('resnet18', 10, 32)
    fc_before, conv_before = model.fc.weight.clone(), model.conv1.weight.clone()
    report = initialise(model, FinetuneConfig(init='ghn', ghn=ghn), num_classes=10)
    assert report['class_layers_predicted'] is False and report['ghn_num_classes'] == 1000
    assert torch.equal(model.fc.weight, fc_before) and 'fc.weight' in report['skipped_reasons']
    assert not torch.equal(model.conv1.weight, conv_before) and model.conv1.weight.shape == (64, 3, 3, 3)


def test_lr_schedule_warmup_then_cosine():
    total, warmup = 100, 5
    f = [lr_factor(s, total, warmup) for s in range(total)]
    assert f[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert f[5] == pytest.approx(1.0) and f[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 94 / 95)))
    assert all(a >= b for a, b in zip(f[5:], f[6:]))  # non-increasing after warm-up
    assert lr_factor(0, 1, 0) == 1.0


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match='valid inits: default, ghn'):
        FinetuneConfig(init='magic')
    with pytest.raises(ValueError, match='valid optimizers'):
        FinetuneConfig(opt='lbfgs')
    cfg = FinetuneConfig(model='resnet50', init='ghn+orth+noise')
    assert cfg.resolved_beta() == 3e-5 and cfg.resolved_layer() == 37  # the published ResNet-50 recipe
    assert FinetuneConfig(init='ghn+orth').resolved_beta() == 0.0
    assert FinetuneConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match='unknown fine-tuning options'):
        FinetuneConfig.from_dict({'modle': 'resnet18'})
    assert set(INITS) == {'default', 'ghn', 'ghn+orth', 'ghn+orth+noise'}


def test_data_seed_fixes_the_subsets_across_run_seeds():
    from ghnviz.finetune import _Data

    def subsets(**kw):
        d = _Data(_config(**kw), torch.device('cpu'))
        return d.train.images, d.test.images

    a_train, a_test = subsets(seed=1, data_seed=7)
    b_train, b_test = subsets(seed=2, data_seed=7)
    assert torch.equal(a_train, b_train) and torch.equal(a_test, b_test)  # data fixed, run seed varies
    c_train, _ = subsets(seed=7)  # unset: the run seed chooses the data
    assert torch.equal(a_train, c_train)
    d_train, _ = subsets(seed=1)
    assert len(d_train) == len(a_train) == 100 and not torch.equal(d_train, a_train)


SMALL_CODE = """
import torch
from torch import nn

class Small(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))
"""


FIXED_CODE = """
from torch import nn

class Fixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))
"""


@pytest.mark.slow
def test_pasted_model_from_the_command_line(tmp_path, capsys):
    from ghnviz.cli import main

    code = tmp_path / 'small.py'
    code.write_text(SMALL_CODE)
    db = tmp_path / 'runs.sqlite'
    data = str(shared_file('data', 'cifar10-jpeg.tar.xz'))
    ghn = str(shared_file('conformance', 'ghn2_cifar10_random.pt'))
    args = ['finetune', '--model', 'Small', '--model-file', str(code), '--init', 'ghn+orth', '--ghn', ghn]
    args += ['--data-path', data, '--shots', '5', '--steps', '2', '--eval-limit', '50', '--db', str(db)]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out['status'] == 'done' and out['steps'] == 2 and 0 <= out['test/acc'] <= 100
    with RunStore(db) as store:
        run = store.list_runs()[0]
        assert run.config['model'] == 'Small' and run.config['model_code'] == SMALL_CODE
        init = next(e['message'] for e in store.events(run.id) if e['message'].startswith('init:'))
    # all six tensors predicted; orthogonalised: the conv weight only (the classifier is left alone)
    assert "'predicted': 6," in init and "'postprocessed': 1}" in init

    assert main(['finetune', '--model', 'Small', '--model-file', str(tmp_path / 'absent.py'), '--no-db']) == 2
    assert 'cannot read --model-file' in capsys.readouterr().err


def test_pasted_model_is_checked_before_training(monkeypatch):
    from ghnviz.finetune import build_model
    from ghnviz.zoo.pasted import PastedCodeError

    model = build_model('Small', 10, 32, code=SMALL_CODE)
    assert model.fc.out_features == 10 and model.training  # built for the task, left in train mode
    assert build_model('Small', 7, 32, code=SMALL_CODE).fc.out_features == 7
    with pytest.raises(ValueError, match=r'returns \(2, 5\) .* not \(2, 10\)'):
        build_model('Fixed', 10, 32, code=FIXED_CODE)
    with pytest.raises(ValueError, match='fails on 3x32x32 images'):
        build_model('Small', 10, 32, code=SMALL_CODE.replace('nn.Conv2d(3,', 'nn.Conv2d(4,'))
    with pytest.raises(PastedCodeError, match="class 'Other' is not defined"):
        build_model('Other', 10, 32, code=SMALL_CODE)
    monkeypatch.setenv('GHNVIZ_ALLOW_CODE', '0')
    with pytest.raises(PastedCodeError, match='disabled'):
        build_model('Small', 10, 32, code=SMALL_CODE)
