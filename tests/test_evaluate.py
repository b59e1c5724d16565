"""Evaluation of predicted parameters: JSON output, batch statistics, baselines, fixed mixed test order."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from conftest import shared_file

import ghnviz
from ghnviz import evaluate as ev
from ghnviz.train import TrainConfig, build_ghn


@pytest.fixture(scope='module')
def tiny_ghn_file(tmp_path_factory):
    torch.manual_seed(0)
    ghn = build_ghn(TrainConfig(hid=16, max_shape=(16, 16, 7, 7)), num_classes=10)
    return ghnviz.save_ghn(ghn, tmp_path_factory.mktemp('ghn') / 'tiny.safetensors')


def test_cli_writes_json_with_mean_top1(tiny_ghn_file, tmp_path, capsys):
    from ghnviz.cli import main

    data = shared_file('data', 'cifar10-jpeg.tar.xz')
    out = tmp_path / 'eval.json'
    argv = ['evaluate', '--ghn', str(tiny_ghn_file), '--split', 'test', '--n', '2', '--dataset', 'cifar10']
    argv += ['--data-path', str(data), '--json', str(out), '--batch-size', '16', '--limit-per-class', '4']
    argv += ['--baselines', 'resnet18', '--no-progress']
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result['n'] == 2 and [r['name'] for r in result['results']] == ['test/0', 'test/1']
    assert result['n_images'] == 40 and result['dataset'] == 'cifar10'
    top1 = [r['top1'] for r in result['results']]
    assert all(0 <= t <= 100 for t in top1)
    assert result['mean_top1'] == pytest.approx(sum(top1) / 2, abs=1e-3)
    assert set(result['baselines']) == {'resnet18'} and 0 <= result['baselines']['resnet18']['top1'] <= 100
    assert all(r['skipped_tensors'] == 0 and r['predicted_tensors'] > 0 for r in result['results'])
    assert 'mean top-1 over 2 test architectures' in capsys.readouterr().out


def test_library_is_deterministic_and_uses_batch_statistics(tiny_ghn_file):
    data = shared_file('data', 'cifar10-jpeg.tar.xz')
    ghn = ghnviz.load_ghn(tiny_ghn_file)
    kw = dict(n=1, start=3, data_path=data, batch_size=10, limit_per_class=2, baselines=())
    a, b = ev.evaluate_ghn(ghn, **kw), ev.evaluate_ghn(tiny_ghn_file, **kw)
    assert a['results'][0]['top1'] == b['results'][0]['top1'] and a['n'] == 1 and a['baselines'] == {}

    batches = ev._test_batches('cifar10', data, 10, None, 'cpu', limit_per_class=2)
    assert len(batches) == 2 and len(torch.unique(batches[0][1])) > 2  # classes are mixed within a batch
    model = ghnviz.create_model('deepnets1m:test/3', num_classes=10, is_imagenet_input=False)
    res = ev.evaluate_model(ghn, model, batches, 'test/3')
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.training and not m.track_running_stats for m in bns)
    assert not model.training and res['top1'] == a['results'][0]['top1']


def test_unknown_baseline_fails_before_any_work(tiny_ghn_file, tmp_path, capsys):
    from ghnviz.cli import main

    missing = tmp_path / 'no-such-archive.tar.xz'  # reading it would fail with another message
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*Close matches: resnet18"):
        ev.evaluate_ghn(tiny_ghn_file, n=1, data_path=missing, baselines=('resnet19',))
    argv = ['evaluate', '--ghn', str(tiny_ghn_file), '--n', '1', '--data-path', str(missing), '--no-progress']
    assert main(argv + ['--baselines', 'resnet18,resnet19']) == 2
    assert "unknown model 'resnet19'" in capsys.readouterr().err


def test_cli_baselines_none_evaluates_no_baseline(tiny_ghn_file, tmp_path):
    from ghnviz.cli import main

    data = shared_file('data', 'cifar10-jpeg.tar.xz')
    out = tmp_path / 'eval.json'
    argv = ['evaluate', '--ghn', str(tiny_ghn_file), '--n', '1', '--data-path', str(data), '--json', str(out)]
    argv += ['--batch-size', '10', '--limit-per-class', '2', '--baselines', 'none', '--no-progress']
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result['baselines'] == {} and result['n'] == 1
