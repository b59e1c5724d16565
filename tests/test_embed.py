"""Graph embeddings against the training distribution: reference cache, shift score, projections.

Runs with the conformance GHN-2 (CIFAR-10 configuration, random weights) and a 48-architecture
reference set computed once into a temporary cache. Even with random weights the GHN's embedding
encodes primitive types and tensor shapes, which is what separates the odd models below from
DeepNets-1M architectures.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import shared_file

import ghnviz
from ghnviz.embed import (
    DEFAULT_N,
    Projection,
    compute_reference,
    distribution_shift,
    ghn_hash,
    loo_knn_distances,
    predict_property,
    projection,
    query_model,
    reference_set,
)
from ghnviz.embed import store as store_mod
from ghnviz.zoo.deepnets1m.space import ArchSpec

N_REF = 48  # reference architectures (train/0 .. train/47), ~15 s to embed
K = 5  # neighbours: about a tenth of the reference set, as k=10 is for larger sets
HELD_OUT = range(1000, 1008)  # training-split architectures that are not in the reference set


def _ghn_file():
    return shared_file('conformance', 'ghn2_cifar10_random.pt')


@pytest.fixture(scope='module')
def ghn():
    return ghnviz.load_ghn(_ghn_file())


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp('embed-cache')


@pytest.fixture(scope='module')
def ref(ghn, cache):
    return reference_set(ghn, n=N_REF, cache_dir=cache, batch_size=16)


def plain_1x1_stack() -> nn.Module:
    """Eight 1x1 convolutions with ReLUs, no normalisation, no spatial kernels, no branches."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 1)]
    for _ in range(8):
        layers += [nn.Conv2d(64, 64, 1), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    model.expected_input_sz = 32
    return model.eval()


def mlp() -> nn.Module:
    """A multilayer perceptron on flattened pixels."""
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * 32 * 32, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )
    model.expected_input_sz = 32
    return model.eval()


def test_reference_set_contents(ref, ghn, cache):
    assert ref.embeddings.shape == (N_REF, ghn.config.hid)
    assert ref.embeddings.dtype == np.float32
    assert np.array_equal(ref.embeddings, ref.embeddings.astype(np.float16).astype(np.float32))
    assert ref.names == [f'train/{i}' for i in range(N_REF)]
    assert (cache / f'{ref.key}.npz').is_file() and (cache / f'{ref.key}.json').is_file()
    card = json.loads((cache / f'{ref.key}.json').read_text())
    assert card['ghn_hash'] == ghn_hash(ghn) and card['n'] == N_REF and card['is_imagenet_input'] is False
    row = ref.row(7)
    spec = ArchSpec.from_json(row['spec'])
    assert spec.name == 'train/7' and row['description'] == spec.describe()
    assert row['num_params'] == spec.num_params(num_classes=10, is_imagenet_input=False)
    assert row['n_nodes'] > row['depth'] > 0 and row['avg_degree'] > 1
    assert ref.ops.sum(1).tolist() == ref.table['n_nodes'].tolist()
    assert len(set(ref.table['signature'])) == N_REF
    df = ref.to_frame()
    assert len(df) == N_REF and df.loc[7, 'name'] == 'train/7'
    assert df.loc[7, 'avg_degree'] == row['avg_degree']


def test_cache_hit_and_miss_by_checkpoint_hash(ghn, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger='ghnviz.embed.store')
    a = reference_set(ghn, n=3, cache_dir=tmp_path, batch_size=2)
    assert 'cache miss' in caplog.text
    assert (tmp_path / f'{ghn_hash(ghn)[:16]}_train_3.npz').is_file()

    caplog.clear()

    def no_compute(*args, **kwargs):
        raise AssertionError('a cache hit must not compute')

    monkeypatch.setattr(store_mod, 'compute_reference', no_compute)
    b = reference_set(ghn, n=3, cache_dir=tmp_path)
    assert 'cache hit' in caplog.text
    assert np.array_equal(a.embeddings, b.embeddings) and a.names == b.names
    out = tmp_path / 'assets'  # `embed reference --out DIR` with the set already cached: copied there
    reference_set(ghn, n=3, cache_dir=tmp_path, out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == [f'{a.key}.json', f'{a.key}.npz']

    same = ghnviz.load_ghn(_ghn_file())  # another object with the same weights: same hash, hit
    assert ghn_hash(same) == ghn_hash(ghn)
    assert reference_set(same, n=3, cache_dir=tmp_path, compute=False).path == b.path

    other = ghnviz.load_ghn(_ghn_file())
    with torch.no_grad():
        other.op_embed.weight.mul_(1.5)  # different weights, same config
    assert ghn_hash(other) != ghn_hash(ghn)
    with pytest.raises(FileNotFoundError):
        reference_set(other, n=3, cache_dir=tmp_path, compute=False)
    monkeypatch.undo()
    caplog.clear()
    c = reference_set(other, n=3, cache_dir=tmp_path)
    assert 'cache miss' in caplog.text
    assert c.names == a.names and not np.allclose(c.embeddings, a.embeddings, atol=1e-2)
    assert len(list(tmp_path.glob('*_train_3.npz'))) == 2


def test_reference_matches_single_query_and_skips_decoding(ghn, ref, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError('embedding must not decode parameters')

    monkeypatch.setattr(type(ghn), '_decode', no_decoding)
    direct = compute_reference(ghn, n=2, start=5, batch_size=2)  # batched forward over two graphs
    for j, i in enumerate((5, 6)):
        model = query_model(f'deepnets1m:train/{i}', ghn)
        emb = ghn.embed(model).vector.numpy()
        np.testing.assert_allclose(ref.embeddings[i], emb, atol=2e-3 * np.abs(emb).max())
        np.testing.assert_array_equal(direct.embeddings[j], ref.embeddings[i])
        assert ghn.graph_for(model).signature() == ref.table['signature'][i]


def test_percentile_training_architectures_vs_odd_models(ghn, ref):
    train = [distribution_shift(ghn, f'deepnets1m:train/{i}', k=K, reference=ref) for i in HELD_OUT]
    odd = [distribution_shift(ghn, m, k=K, reference=ref) for m in (plain_1x1_stack(), mlp())]
    train_pct = [r.percentile for r in train]
    assert all(0 <= p <= 100 for p in train_pct)
    assert np.median(train_pct) < 75  # in-distribution percentiles spread over 0-100 (median ~50)
    for r in odd:
        assert r.percentile == 100.0  # farther from its neighbours than every reference architecture
        assert r.percentile > max(train_pct)
        assert r.mahalanobis > max(t.mahalanobis for t in train)
        assert r.distance > 2 * np.median([t.distance for t in train])


def test_reference_member_is_left_out_and_scored_like_its_own_loo(ghn, ref):
    i = 11
    r = distribution_shift(ghn, f'deepnets1m:train/{i}', k=K, reference=ref)
    assert r.matches == [f'train/{i}']
    assert all(nb.name != f'train/{i}' for nb in r.neighbours)
    loo = loo_knn_distances(ref, K)
    assert r.distance == pytest.approx(loo[i], rel=2e-3)
    others = np.delete(loo, i)
    expected = 100 * np.mean(others < loo[i]) * (N_REF - 1) / N_REF + 100 * 0.5 / N_REF
    assert abs(r.percentile - expected) <= 100 / N_REF + 1e-9


def test_neighbours_sorted_and_loadable(ghn, ref):
    assert ghnviz.distribution_shift is distribution_shift  # the public name
    r = ghnviz.distribution_shift(ghn, 'resnet18', k=K, reference=ref)
    d = [nb.distance for nb in r.neighbours]
    assert len(d) == K and d == sorted(d)
    z = ref.standardise()
    q = ref.standardise(r.embedding)[0]
    all_d = np.linalg.norm(z - q, axis=1)
    assert [nb.index for nb in r.neighbours] == np.argsort(all_d)[:K].tolist()
    np.testing.assert_allclose(d, np.sort(all_d)[:K], rtol=1e-5)
    assert r.distance == pytest.approx(np.mean(d))
    nb = r.neighbours[0]
    assert nb.name == ref.names[nb.index] and nb.spec().name == nb.name
    model = ghnviz.create_model(nb.spec(), num_classes=10, is_imagenet_input=False)
    assert sum(p.numel() for p in model.parameters()) == nb.num_params
    data = json.loads(r.to_json())
    assert len(data['neighbours']) == K and len(data['embedding']) == ghn.config.hid


@pytest.mark.parametrize('method', ['pca', 'tsne'])
def test_projection_shapes_and_seeded_determinism(ref, method):
    x = ref.embeddings[:3] + 0.05  # (3, hid) new points
    p1 = Projection(method, seed=3, perplexity=10).fit(ref)
    p2 = Projection(method, seed=3, perplexity=10).fit(ref)
    assert p1.reference_coords.shape == (N_REF, 2)
    ref_xy, q = p1.place(x)
    assert ref_xy.shape == (N_REF, 2) and q.shape == (3, 2)
    np.testing.assert_array_equal(p1.reference_coords, p2.reference_coords)
    np.testing.assert_array_equal(q, p2.transform(x))
    if method == 'pca':
        np.testing.assert_allclose(p1.transform(ref.embeddings), p1.reference_coords, atol=1e-4)
        assert p1.can_transform
    else:
        assert not p1.can_transform and not np.array_equal(ref_xy, p1.reference_coords)  # refitted jointly


@pytest.mark.slow
def test_umap_projection(ref):
    p1 = Projection('umap', n_neighbors=8, seed=0).fit(ref)
    p2 = Projection('umap', n_neighbors=8, seed=0).fit(ref)
    np.testing.assert_array_equal(p1.reference_coords, p2.reference_coords)
    q = p1.transform(ref.embeddings[:2])
    assert q.shape == (2, 2) and np.isfinite(q).all()
    np.testing.assert_array_equal(q, p2.transform(ref.embeddings[:2]))


def test_projection_cache(ref):
    a = projection(ref, 'pca', seed=0)
    assert projection(ref, 'pca', seed=0) is a
    assert projection(ref, 'pca', seed=1) is not a
    with pytest.raises(ValueError, match='known'):
        Projection('isomap')


def test_property_prediction_from_embeddings(ref):
    fit = predict_property(ref, 'log_params', 'embedding', 'ridge', test_fraction=0.25, seed=0)
    assert (fit.n_train, fit.n_test) == (36, 12)
    assert fit.r2 > 0.3 and fit.kendall_tau > 0.3
    with pytest.raises(ValueError, match='known'):
        predict_property(ref, 'accuracy')


def test_cli_shift_uses_the_cache(ref, cache, tmp_path, capsys, monkeypatch):
    from ghnviz import cli, cli_embed

    assert cli_embed.DEFAULT_N == DEFAULT_N

    def no_compute(*args, **kwargs):
        raise AssertionError('the cached reference set must be used')

    monkeypatch.setattr(store_mod, 'compute_reference', no_compute)
    out = tmp_path / 'shift.json'
    argv = ['embed', 'shift', '--ghn', str(_ghn_file()), '--model', 'deepnets1m:test/0', '--k', str(K)]
    rc = cli.main(argv + ['--n', str(N_REF), '--cache-dir', str(cache), '--json', str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert 'percentile' in text and 'mahalanobis' in text and 'train/' in text
    data = json.loads(out.read_text())
    assert 0 <= data['percentile'] <= 100 and len(data['neighbours']) == K
    assert data['reference'] == ref.key
