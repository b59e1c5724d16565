"""GHN-3: conformance with the published implementation, config inference, checkpoint loading, hub names."""

from __future__ import annotations

import argparse
import os
import shutil

import joblib
import pytest
import torch
from conftest import shared_file

import ghnviz
from ghnviz.hyper import hub
from ghnviz.hyper.ghn import GHN2
from ghnviz.hyper.ghn3 import GHN3, GHN3Config, infer_config
from ghnviz.hyper.io import GHNLoadError

MODELS = {
    # conformance model -> create_model keyword arguments (ImageNet GHN-3: 1000 classes)
    'resnet18': {},
    'resnet50': {},
    'convnext_tiny': {},
    'vit_b_16': {},
    'efficientnet_b0': {},
    'mobilenet_v3_small': {},
    'deepnets1m:DARTS': dict(C=16, n_cells=8, is_imagenet_input=True),
}


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def ghn3_file():
    return shared_file('conformance', 'ghn3_tiny_random.joblib')


@pytest.fixture(scope='module')
def ghn(ghn3_file):
    return ghnviz.load_ghn(ghn3_file)


def _fingerprint(t: torch.Tensor) -> dict:
    x = t.detach().double().flatten()
    n = x.numel()
    idx = [0, n // 3, (2 * n) // 3, n - 1]
    return dict(
        sum=x.sum().item(),
        abs_sum=x.abs().sum().item(),
        l2=x.square().sum().sqrt().item(),
        sample=x[idx].tolist(),
    )


def _mismatch(got: dict, want: dict) -> str | None:
    """The README tolerance: l2/abs_sum rel 1e-4, sum within 1e-4 * abs_sum, samples abs 1e-5."""
    rel = max(abs(got[k] - want[k]) / max(abs(want[k]), 1e-30) for k in ('l2', 'abs_sum'))
    sum_err = abs(got['sum'] - want['sum']) / max(want['abs_sum'], 1e-30)
    sample_err = max(abs(a - b) for a, b in zip(got['sample'], want['sample']))
    if rel > 1e-4 or sum_err > 1e-4 or sample_err > 1e-5:
        return f'rel {rel:.2e}, sum {sum_err:.2e}, sample {sample_err:.2e}'
    return None


@pytest.mark.parametrize('name', list(MODELS))
def test_conformance(ghn, expected, name):
    record = expected['results']['ghn3_tiny/ghn3'][name]
    torch.manual_seed(0)
    model = ghnviz.create_model(name, num_classes=1000, **MODELS[name])
    torch.manual_seed(0)  # the class-token row of a ViT position embedding is the first draw after this
    pred = ghn.predict(model)

    want_predicted = {p['name'] for p in record['params'] if p['predicted']}
    assert set(pred.predicted) == want_predicted
    assert set(pred.skipped) == set(record['not_predicted'])
    assert pred.graph.n_nodes == record['graph']['n_nodes']

    params = dict(model.named_parameters())
    bad = {}
    for rec in record['params']:
        if not rec['predicted']:
            continue
        p = params[rec['name']]
        assert list(p.shape) == rec['shape']
        problem = _mismatch(_fingerprint(p), rec)
        if 'without_first_token' in rec:  # also check the part that does not depend on the global RNG
            problem = problem or _mismatch(_fingerprint(p[:, 1:]), rec['without_first_token'])
        if problem:
            bad[rec['name']] = problem
    assert not bad, f'{len(bad)} tensors differ: {dict(list(bad.items())[:5])}'


def test_batched_prediction_equals_single(ghn):
    """Two graphs of different sizes in one forward (padded Graphormer batch) give the single-model values."""
    torch.manual_seed(0)
    a, b = ghnviz.create_model('resnet18'), ghnviz.create_model('mobilenet_v3_small')
    ghn.predict([a, b])
    batched = {n: p.detach().clone() for n, p in b.named_parameters()}
    ghn.predict(b)
    for n, p in b.named_parameters():
        torch.testing.assert_close(p.detach(), batched[n], rtol=1e-5, atol=1e-6)


def test_load_and_infer_config(ghn, ghn3_file, expected):
    assert isinstance(ghn, GHN3) and not ghn.training
    want = expected['ghn_files']['ghn3_tiny']['constructor_config']
    cfg = ghn.config
    assert cfg.max_shape == tuple(want['max_shape']) and cfg.num_classes == want['num_classes']
    assert (cfg.hid, cfg.heads, cfg.layers) == (want['hid'], want['heads'], want['layers'])
    assert cfg.is_ghn2 is False and cfg.weight_norm and cfg.ve and cfg.layernorm
    shapes = expected['ghn_files']['ghn3_tiny']['state_dict_shapes']
    assert {k: list(v.shape) for k, v in ghn.state_dict().items()} == shapes
    assert list(ghn.state_dict()) == list(shapes)  # same order as the published files


@pytest.mark.parametrize(
    'config',
    [
        GHN3Config(hid=96, layers=2, max_shape=(96, 96, 11, 11), num_classes=10),  # hid > 64: 16 heads
        GHN3Config(hid=32, layers=4, max_shape=(32, 32, 16, 16), num_classes=100, layernorm=False),
    ],
)
def test_infer_config_round_trip(config):
    state = GHN3(config).state_dict()
    inferred = infer_config(state)
    assert inferred == GHN3Config(**{**config.to_dict(), 'heads': 16 if config.hid > 64 else 8})


def test_infer_config_rules():
    state = GHN3(GHN3Config(hid=32, layers=1, max_shape=(32, 32, 16, 16))).state_dict()
    gru = {**state, 'gnn.gru.weight_ih': torch.zeros(3)}
    assert infer_config(gru).is_ghn2
    del state['decoder.conv.2.weight']
    with pytest.raises(ValueError, match='decoder.conv.2.weight'):
        infer_config(state)
    with pytest.raises(ValueError, match='ghn2'):
        GHN3(GHN3Config(is_ghn2=True))


def _small_ghn3() -> GHN3:
    torch.manual_seed(3)
    return GHN3(GHN3Config(hid=32, heads=8, layers=2, max_shape=(32, 32, 16, 16), num_classes=1000)).eval()


def test_trainer_checkpoint(tmp_path):
    """A checkpoint as the GHN-3 training script writes it: an argparse.Namespace inside, optimizer state."""
    ghn = _small_ghn3()
    opt = torch.optim.AdamW(ghn.parameters(), lr=4e-4)
    sum(p.square().sum() for p in ghn.parameters()).backward()
    opt.step()  # gives the optimizer a state (exp_avg tensors) to store
    config = {**ghn.config.to_dict(), 'hypernet': 'gatedgnn', 'max_shape': (32, 32, 16, 16)}
    args = argparse.Namespace(
        lr=4e-4, hid=32, layers=2, heads=8, amp=True, save='./checkpoints', max_shape=None
    )
    path = tmp_path / 'ghn3_trained.pt'
    torch.save(
        {'state_dict': ghn.state_dict(), 'optimizer': opt.state_dict(), 'epoch': 2, 'step': 99}
        | {'args': args, 'config': config},
        path,
    )
    loaded = ghnviz.load_ghn(path)
    assert isinstance(loaded, GHN3) and loaded.config == ghn.config
    for k, v in ghn.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    m1, m2 = ghnviz.create_model('resnet18'), ghnviz.create_model('resnet18')
    torch.manual_seed(0)
    ghn.predict(m1)
    torch.manual_seed(0)
    loaded.predict(m2)
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p1, p2), n

    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {tmp_path / "marker"}',))

    evil = tmp_path / 'evil.pt'
    torch.save({'state_dict': ghn.state_dict(), 'config': config, 'args': Payload()}, evil)
    with pytest.raises(GHNLoadError, match='refused'):
        ghnviz.load_ghn(evil)
    assert not (tmp_path / 'marker').exists()


def test_save_load_round_trip(tmp_path):
    ghn = _small_ghn3()
    path = ghnviz.save_ghn(ghn, tmp_path / 'ghn3.safetensors')
    loaded = ghnviz.load_ghn(path)
    assert type(loaded) is GHN3 and loaded.config == ghn.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ghn.state_dict().items())


def test_top_level_structure_embeddings(tmp_path):
    """Files that keep the degree/distance tables at the top level load into block 0."""
    ghn = _small_ghn3()
    moved = {f'gnn.0.{n}.weight' for n in ('centrality_embed_in', 'centrality_embed_out', 'input_dist_embed')}
    state = {(k[len('gnn.0.') :] if k in moved else k): v for k, v in ghn.state_dict().items()}
    assert 'centrality_embed_in.weight' in state and 'input_dist_embed.weight' in state
    joblib.dump(state, tmp_path / 'moved.pt')
    loaded = ghnviz.load_ghn(tmp_path / 'moved.pt')
    assert torch.equal(loaded.gnn[0].input_dist_embed.weight, ghn.gnn[0].input_dist_embed.weight)


def test_ghn2_saved_by_ghn3_code_loads_as_ghn2(tmp_path):
    """A GHN-2 state dict with linear-layout decoder weights (how the GHN-3 code stores it) -> 'ghn2'."""
    torch.manual_seed(0)
    ghn2 = GHN2(max_shape=(64, 64, 16, 16), num_classes=1000)
    state = {
        k: (v.flatten(1) if k.startswith('decoder.') and v.dim() == 4 else v)
        for k, v in ghn2.state_dict().items()
    }
    joblib.dump(state, tmp_path / 'ghn2.pt')
    assert infer_config(state).is_ghn2
    loaded = ghnviz.load_ghn(tmp_path / 'ghn2.pt')
    assert isinstance(loaded, GHN2)
    for k, v in ghn2.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv('GHNVIZ_CACHE', str(tmp_path / 'ghnviz'))
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
    monkeypatch.delenv('HF_HUB_CACHE', raising=False)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    return tmp_path


def test_hub_offline_error(empty_caches):
    with pytest.raises(hub.CheckpointNotFoundError) as err:
        ghnviz.load_ghn('ghn3tm8')
    msg = str(err.value)
    assert (
        'ghn3tm8.pt' in msg and str(empty_caches / 'ghnviz' / 'ghn3tm8.pt') in msg and 'HF_HUB_OFFLINE' in msg
    )
    assert 'huggingface.co/SamsungSAILMontreal/ghn3' in msg
    with pytest.raises(KeyError, match='ghn3xlm16'):
        hub.resolve('ghn4')


def test_hub_local_caches(empty_caches, ghn3_file):
    own = empty_caches / 'ghnviz'
    own.mkdir()
    shutil.copy(ghn3_file, own / 'ghn3tm8.pt')
    ghn = ghnviz.load_ghn('ghn3tm8')
    assert isinstance(ghn, GHN3) and ghn.config.hid == 64
    assert hub.resolve('ghn3tm8.pt') == own / 'ghn3tm8.pt'

    # the Hugging Face cache layout: models--<org>--<repo>/snapshots/<revision>/<file>, refs/main = revision
    repo = empty_caches / 'hf' / 'hub' / 'models--SamsungSAILMontreal--ghn3'
    (repo / 'snapshots' / 'abc123').mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text('abc123')
    shutil.copy(ghn3_file, repo / 'snapshots' / 'abc123' / 'ghn3sm8.pt')
    assert hub.resolve('ghn3sm8') == repo / 'snapshots' / 'abc123' / 'ghn3sm8.pt'
    with pytest.raises(hub.CheckpointNotFoundError, match='ghn3lm8.pt'):
        hub.resolve('ghn3lm8')
