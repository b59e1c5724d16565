"""GHN checkpoint I/O: official GHN-2 files, ghnviz's own format, and refusal of unsafe or foreign files."""

from __future__ import annotations

import os
import pickle
from functools import cache

import pytest
import torch
import torch.nn as nn
from conftest import shared_file

import ghnviz
from ghnviz.hyper.ghn2 import GHN2
from ghnviz.hyper.io import DEFAULT_CHECKPOINT, GHNLoadError, read_checkpoint


@cache
def official(name: str) -> dict:
    return torch.load(shared_file('conformance', f'{name}_random.pt'), weights_only=True)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


@pytest.mark.parametrize('name', ['ghn2_cifar10', 'ghn2_imagenet'])
def test_loads_official_ghn2_files(name, expected):
    ghn = ghnviz.load_ghn(shared_file('conformance', f'{name}_random.pt'))
    ck = official(name)
    assert isinstance(ghn, GHN2) and not ghn.training and ghn.device == torch.device('cpu')
    assert ghn.config.to_dict() == {**ck['config'], 'max_shape': list(ck['config']['max_shape'])}
    assert sum(p.numel() for p in ghn.parameters()) == expected['ghn_files'][name]['n_params']
    state = ghn.state_dict()
    assert list(state) == list(ck['state_dict'])
    assert all(torch.equal(state[k], v) for k, v in ck['state_dict'].items())


def test_save_and_load_round_trip(tmp_path):
    ghn = ghnviz.load_ghn(shared_file('conformance', 'ghn2_cifar10_random.pt'))
    path = ghnviz.save_ghn(ghn, tmp_path / 'ghn.safetensors')
    assert read_checkpoint(path).info['reader'] == 'ghnviz'
    again = ghnviz.load_ghn(path)
    assert type(again) is type(ghn) and again.config == ghn.config
    assert all(torch.equal(a, b) for a, b in zip(ghn.state_dict().values(), again.state_dict().values()))
    models = [Small(), Small()]
    for g, m in zip([ghn, again], models):
        g.predict(m)
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))


def test_ghn2_tensors_without_config_and_extra_keys(tmp_path):
    ck = official('ghn2_imagenet')
    # a bare state dict with the decoder's 1x1 layers as linear weights, as GHN-3 code stores GHN-2
    bare = {
        k: (v.flatten(1) if k.startswith('decoder.conv') and v.dim() == 4 else v)
        for k, v in ck['state_dict'].items()
    }
    torch.save(bare, tmp_path / 'bare.pt')
    ghn = ghnviz.load_ghn(tmp_path / 'bare.pt')
    assert ghn.config.max_shape == (64, 64, 16, 16) and ghn.num_classes == 1000 and ghn.config.weight_norm
    assert all(torch.equal(ghn.state_dict()[k], v) for k, v in ck['state_dict'].items())
    # a training checkpoint with optimiser state (under its historical key) and other extras
    torch.save({**ck, 'optimzer': {'state': {}, 'param_groups': []}, 'note': 'x'}, tmp_path / 'train.pt')
    assert ghnviz.load_ghn(tmp_path / 'train.pt').config == ghnviz.load_ghn(tmp_path / 'bare.pt').config


@pytest.mark.parametrize('writer', ['torch', 'pickle'])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pt'
    obj = {'state_dict': {'embed.weight': torch.zeros(15, 32)}, 'config': Payload(marker)}
    if writer == 'torch':
        torch.save(obj, path)
    else:
        with open(path, 'wb') as f:
            pickle.dump(obj, f)
    with pytest.raises(GHNLoadError, match='refused') as info:
        ghnviz.load_ghn(path)
    assert '\n' not in str(info.value)
    assert not marker.exists()


def test_clear_errors(tmp_path):
    with pytest.raises(GHNLoadError, match='no such file'):
        ghnviz.load_ghn(tmp_path / 'missing.pt')
    (tmp_path / 'notes.txt').write_text('hello, not a checkpoint\n')
    with pytest.raises(GHNLoadError, match='not a GHN checkpoint'):
        ghnviz.load_ghn(tmp_path / 'notes.txt')
    (tmp_path / 'empty.pt').write_bytes(b'')
    with pytest.raises(GHNLoadError, match='empty'):
        ghnviz.load_ghn(tmp_path / 'empty.pt')
    torch.save({'state_dict': {'backbone.weight': torch.zeros(3)}}, tmp_path / 'other.pt')
    with pytest.raises(GHNLoadError, match='unknown GHN architecture'):
        ghnviz.load_ghn(tmp_path / 'other.pt')
    torch.save({'state_dict': dict(Small().state_dict())}, tmp_path / 'model.pt')
    with pytest.raises(GHNLoadError, match='unknown GHN architecture'):
        ghnviz.load_ghn(tmp_path / 'model.pt')
    broken = dict(official('ghn2_cifar10'))
    broken['state_dict'] = {k: v for k, v in broken['state_dict'].items() if k != 'gnn.gru.bias_hh'}
    torch.save(broken, tmp_path / 'broken.pt')
    with pytest.raises(GHNLoadError, match='missing'):
        ghnviz.load_ghn(tmp_path / 'broken.pt')
    with pytest.raises(GHNLoadError, match='folder'):
        ghnviz.load_ghn(tmp_path)


def test_default_name():
    if DEFAULT_CHECKPOINT.exists():
        assert isinstance(ghnviz.load_ghn('default'), ghnviz.hyper.ghn.GHN)
    else:
        with pytest.raises(GHNLoadError, match='default GHN'):
            ghnviz.load_ghn('default')
