"""The restricted checkpoint reader: same tensors as joblib, refuses anything that could run code."""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import warnings

import joblib
import numpy as np
import pytest
import torch
from conftest import shared_file

from ghnviz.hyper.safe_pickle import (
    ALLOWED_GLOBALS,
    UnsafePickleError,
    load_file,
    load_pickle,
    load_torch_file,
    sniff_format,
)


class _WritesMarker:
    """A pickle payload that would create a file when unpickled by an unrestricted loader."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f'touch {self.path}',))


class _OpensMarker:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_conformance_file_equals_joblib_load():
    path = shared_file('conformance', 'ghn3_tiny_random.joblib')
    ours = load_pickle(path)
    ref = joblib.load(path)
    assert type(ours) is collections.OrderedDict
    assert list(ours) == list(ref) and len(ours) == 60
    for name, t in ref.items():
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape, name
        assert torch.equal(ours[name], t), name
    assert ours._metadata == ref._metadata
    assert sniff_format(path) == 'pickle'
    assert load_file(path).keys() == ref.keys()


@pytest.mark.parametrize('payload', [_WritesMarker, _OpensMarker])
@pytest.mark.parametrize('writer', ['pickle', 'joblib'])
def test_malicious_file_is_refused_and_payload_does_not_run(tmp_path, payload, writer):
    marker = tmp_path / 'marker'
    obj = collections.OrderedDict(w=torch.ones(2), evil=payload(str(marker)))
    path = tmp_path / 'evil.pt'
    if writer == 'joblib':
        joblib.dump(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(UnsafePickleError) as err:
        load_pickle(path)
    global_name = f'{os.name}.system' if payload is _WritesMarker else 'io.open'
    assert global_name in str(err.value)
    assert not marker.exists()


class _TensorWithHook:
    """A tensor record whose backward-hooks argument is not empty (torch itself no longer writes hooks)."""

    def __reduce__(self):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            storage = torch.ones(3).storage()
        return (
            torch._utils._rebuild_tensor_v2,
            (storage, 0, (3,), (1,), False, collections.OrderedDict(h=1)),
        )


def test_refuses_hooks_and_unknown_classes():
    with pytest.raises(UnsafePickleError, match='backward hooks'):
        load_pickle(io.BytesIO(pickle.dumps({'t': _TensorWithHook()})))
    with pytest.raises(UnsafePickleError, match='argparse.Namespace'):
        load_pickle(io.BytesIO(pickle.dumps(argparse.Namespace(a=1))))


@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_parameters_views_and_protocols(protocol):
    base = torch.arange(12, dtype=torch.float32)
    sd = collections.OrderedDict(
        p=torch.nn.Parameter(torch.randn(2, 3)),
        a=base[2:8].view(2, 3),
        t=torch.randn(3, 4).t(),
        h=base.half(),
    )
    out = load_pickle(io.BytesIO(pickle.dumps(sd, protocol=protocol)))
    assert isinstance(out['p'], torch.nn.Parameter) and torch.equal(out['p'], sd['p'])
    for k in ('a', 't', 'h'):
        assert (
            out[k].dtype == sd[k].dtype and out[k].stride() == sd[k].stride() and torch.equal(out[k], sd[k])
        )


@pytest.mark.parametrize('compress', [0, ('zlib', 3), ('gzip', 3), ('xz', 1)])
def test_joblib_numpy_arrays(tmp_path, compress):
    obj = {
        'f32': np.arange(12, dtype=np.float32).reshape(3, 4),
        'fortran': np.asfortranarray(np.random.default_rng(0).normal(size=(3, 5))),
        'big_endian': np.arange(5, dtype='>i4'),
        'empty': np.zeros((0, 3), dtype=np.int64),
        'tensor': torch.linspace(0, 1, 7),
        'meta': [1, 2.5, 'x', None, (3, 4)],
    }
    path = tmp_path / 'arrays.joblib'
    joblib.dump(obj, path, compress=compress)
    out = load_pickle(path)
    for k in ('f32', 'fortran', 'big_endian', 'empty'):
        assert out[k].dtype == obj[k].dtype.newbyteorder('=') and np.array_equal(out[k], obj[k]), k
    assert torch.equal(out['tensor'], obj['tensor']) and out['meta'] == obj['meta']


def test_joblib_object_array_is_refused(tmp_path):
    path = tmp_path / 'objects.joblib'
    joblib.dump({'o': np.array([{'a': 1}, None], dtype=object)}, path)
    with pytest.raises(UnsafePickleError, match='dtype'):
        load_pickle(path)


def test_allow_list_is_small_and_named():
    modules = {m for m, _ in ALLOWED_GLOBALS}
    assert modules <= {
        'collections',
        '_codecs',
        'torch',
        'torch._utils',
        'torch.storage',
        'torch.serialization',
        'joblib.numpy_pickle',
        'numpy',
    }
    assert ('builtins', 'eval') not in ALLOWED_GLOBALS and ('torch', 'load') not in ALLOWED_GLOBALS


def test_torch_checkpoint_with_namespace(tmp_path):
    path = tmp_path / 'trainer.pt'
    ckpt = {'state_dict': {'w': torch.ones(2)}, 'args': argparse.Namespace(lr=4e-4, name='t'), 'epoch': 1}
    torch.save(ckpt, path)
    assert sniff_format(path) == 'torch-zip'
    with pytest.raises(UnsafePickleError):
        load_torch_file(path)  # Namespace not allowed unless asked for
    out = load_file(path)
    assert out['args'] == ckpt['args'] and torch.equal(out['state_dict']['w'], ckpt['state_dict']['w'])

    evil = tmp_path / 'evil_torch.pt'
    marker = tmp_path / 'marker'
    torch.save({'x': _WritesMarker(str(marker))}, evil)
    with pytest.raises(UnsafePickleError):
        load_file(evil)
    assert not marker.exists()

    legacy = tmp_path / 'legacy.pt'
    torch.save({'w': torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert sniff_format(legacy) == 'torch-legacy'
    assert torch.equal(load_file(legacy)['w'], torch.ones(3))
