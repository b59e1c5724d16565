"""The model zoo: create_model / list_models, the DeepNets-1M template, the architecture space, adaptation."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torchvision

import ghnviz
from ghnviz.zoo.adapt import adapt_to_small_images
from ghnviz.zoo.deepnets1m.genotypes import DARTS, GENOTYPES
from ghnviz.zoo.deepnets1m.net import Network
from ghnviz.zoo.deepnets1m.space import (
    SPLITS,
    ArchSpec,
    genotype_bucket,
    sample_architecture,
    sample_architectures,
)
from ghnviz.zoo.deepnets1m.structure import count_params

pytestmark = pytest.mark.usefixtures('one_thread')


DARTS_CASES = {
    # fixture entry -> create_model keyword arguments of the conformance model
    'ghn2_cifar10/ghn3': dict(num_classes=10, C=16, n_cells=8, is_imagenet_input=False),
    'ghn3_tiny/ghn3': dict(num_classes=1000, C=16, n_cells=8, is_imagenet_input=True),
}

# Computed from the reference DeepNets-1M Network with torch.manual_seed(0) before construction:
# (sum_i (i+1) * abs_sum_i, sum_i (i+1) * sum_i) over named_parameters() in order, and a hash of the
# autograd graph of one eval-mode forward pass (op types, parameter names, edges) with its size.
REFERENCE_GOLDENS = {
    'darts_cifar': (
        'deepnets1m:DARTS',
        dict(num_classes=10, C=16, n_cells=8, is_imagenet_input=False),
        32,
        (4065561.77423818, 639934.5800957552),
        ('d06f19dbb117b9e5', 695),
    ),
    'darts_imagenet': (
        'deepnets1m:DARTS',
        dict(num_classes=1000, C=16, n_cells=8, is_imagenet_input=True),
        224,
        (6591829.026928913, 641442.1215922992),
        ('d06f19dbb117b9e5', 695),
    ),
    'vit_small': (
        'deepnets1m:ViT',
        dict(num_classes=10, C=32, n_cells=4, is_imagenet_input=False, preproc=False, C_mult=1),
        32,
        (20983.2427759536, 1619.76588488782),
        ('6c798b176ff032ca', 167),
    ),
    'pdarts_stem1': (
        'deepnets1m:PDARTS',
        dict(num_classes=10, C=16, n_cells=5, is_imagenet_input=False, stem_type=1, fc_layers=2, fc_dim=64),
        32,
        (2295338.3473916287, 346019.1615864571),
        ('d13f8bc39a8b1c2a', 500),
    ),
}


def _seeded(name, **kwargs):
    torch.manual_seed(0)
    return ghnviz.create_model(name, **kwargs)


def _weighted_sums(model) -> tuple[float, float]:
    abs_total, total = 0.0, 0.0
    for i, (_, p) in enumerate(model.named_parameters()):
        x = p.detach().double().flatten()
        abs_total += (i + 1) * x.abs().sum().item()
        total += (i + 1) * x.sum().item()
    return abs_total, total


def _graph_signature(model, out) -> tuple[str, int]:
    """Post-order list of autograd nodes (type, parameter name, input positions), hashed."""
    names = {id(p): n for n, p in model.named_parameters()}
    index, order = {}, []

    def visit(fn):
        if fn is None or fn in index:
            return
        index[fn] = len(index)
        for child, _ in fn.next_functions:
            visit(child)
        label = type(fn).__name__
        if hasattr(fn, 'variable'):
            label += ':' + names.get(id(fn.variable), '?')
        inputs = tuple(index.get(c, -1) if c is not None else None for c, _ in fn.next_functions)
        order.append((label, inputs))

    visit(out.grad_fn)
    return hashlib.sha256(repr(order).encode()).hexdigest()[:16], len(order)


def _small_specs(split: str, k: int = 2, pool: int = 8) -> list[ArchSpec]:
    specs = sample_architectures(split, pool)
    return sorted(specs, key=lambda s: s.num_params(10, False))[:k]


# ---- deepnets1m:DARTS against the conformance fixtures and the reference ----


@pytest.mark.parametrize('case', sorted(DARTS_CASES))
def test_darts_keys_and_shapes_match_fixture(expected, case):
    kwargs = DARTS_CASES[case]
    model = _seeded('deepnets1m:DARTS', **kwargs)
    fixture = expected['results'][case]['deepnets1m:DARTS']['params']
    ours = [(n, list(p.shape)) for n, p in model.named_parameters()]
    assert ours == [(r['name'], r['shape']) for r in fixture]
    assert (
        sum(p.numel() for p in model.parameters())
        == expected['results'][case]['deepnets1m:DARTS']['n_params_total']
    )


@pytest.mark.parametrize('key', sorted(REFERENCE_GOLDENS))
def test_seeded_init_and_graph_match_reference(key):
    name, kwargs, size, sums, signature = REFERENCE_GOLDENS[key]
    model = _seeded(name, **kwargs).eval()
    assert _weighted_sums(model) == pytest.approx(sums, rel=1e-12)
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)  # (B, 3, H, W)
    out = model(x)
    assert out.shape == (2, kwargs['num_classes'])
    assert _graph_signature(model, out) == signature


def test_named_genotypes_and_defaults():
    assert {'DARTS', 'PDARTS', 'ViT'} <= set(GENOTYPES)
    assert {f'deepnets1m:{g}' for g in GENOTYPES} <= set(ghnviz.list_models('deepnets1m'))
    model = ghnviz.create_model('deepnets1m:DARTS', num_classes=10, is_imagenet_input=False)
    assert len(model.cells) == 20 and model.stem[0].out_channels == 3 * 36


def test_light_network_allocates_nothing_and_keeps_rng():
    state = torch.random.get_rng_state()
    light = Network(16, 10, DARTS, 8, is_imagenet_input=False, light=True)
    assert torch.equal(state, torch.random.get_rng_state())
    real = Network(16, 10, DARTS, 8, is_imagenet_input=False)
    assert all(p.is_meta for p in light.parameters())
    assert [(n, p.shape) for n, p in light.named_parameters()] == [
        (n, p.shape) for n, p in real.named_parameters()
    ]


# ---- torchvision ----


@pytest.mark.parametrize('name', ['resnet18', 'mobilenet_v3_small', 'squeezenet1_0'])
def test_torchvision_models_construct(name):
    model = ghnviz.create_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    assert type(ghnviz.create_model(f'torchvision:{name}', num_classes=7)) is type(model)


def test_list_models_covers_torchvision():
    names = ghnviz.list_models()
    assert set(torchvision.models.list_models(module=torchvision.models)) <= set(names)
    assert 'deepnets1m:DARTS' in names and 'deepnets1m:predefined/1' in names
    assert ghnviz.list_models('deepnets1m:test')[:2] == ['deepnets1m:test/0', 'deepnets1m:test/1']
    assert len(ghnviz.list_models('deepnets1m:wide')) == 100


def test_weights_are_never_loaded():
    with pytest.raises(ValueError, match='never downloads'):
        ghnviz.create_model('resnet18', weights='DEFAULT')


@pytest.mark.parametrize(
    'name, hint',
    [
        ('resnet181', 'resnet18'),
        ('deepnets1m:DART', 'deepnets1m:DARTS'),
        ('deepnets1m:tset/3', 'deepnets1m:test/0'),
    ],
)
def test_unknown_name_lists_prefixes_and_close_matches(name, hint):
    with pytest.raises(ValueError) as err:
        ghnviz.create_model(name)
    assert 'deepnets1m:<split>/<index>' in str(err.value) and hint in str(err.value)


def test_out_of_range_index_and_unknown_split():
    with pytest.raises(ValueError, match='500 architectures'):
        ghnviz.create_model('deepnets1m:test/500')
    with pytest.raises(ValueError, match='valid splits'):
        sample_architecture('nope', 0)


# ---- adaptation to 32x32 ----


def test_adapt_resnet18_to_cifar():
    torch.manual_seed(0)
    model = ghnviz.create_model('resnet18', num_classes=10)
    full = model.conv1.weight.detach().clone()  # (64, 3, 7, 7)
    adapt_to_small_images(model)
    assert torch.equal(model.conv1.weight, full[:, :, 2:5, 2:5])
    assert model.conv1.stride == (1, 1) and model.conv1.padding == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity) and model.expected_input_sz == 32
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_adapt_mobilenet_and_unknown_family(caplog):
    model = adapt_to_small_images(ghnviz.create_model('mobilenet_v3_small', num_classes=10))
    strides = [m.stride for m in model.features[:5].modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides and all(s == (1, 1) for s in strides)
    adapt_to_small_images(ghnviz.create_model('efficientnet_b0', num_classes=10))
    assert 'not adapted' in caplog.text


# ---- the DeepNets-1M space ----


def test_split_architecture_is_deterministic():
    spec = sample_architecture('test', 5)
    sample_architecture.cache_clear()
    again = sample_architecture('test', 5)
    assert spec == again and spec is not again
    a, b = (
        ghnviz.create_model('deepnets1m:test/5', num_classes=10),
        ghnviz.create_model('deepnets1m:test/5', 10),
    )
    assert a.genotype == b.genotype == spec.genotype
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [
        (k, v.shape) for k, v in b.state_dict().items()
    ]


def test_sampler_stream_is_stable():
    # pins the exact architectures: a change here means split indices now name different networks
    text = '|'.join(s.to_json() for s in sample_architectures('test', 3) + sample_architectures('train', 3))
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == '7a3e8dc9716bd12b'


def test_train_and_test_are_disjoint():
    train = {s.genotype for s in sample_architectures('train', 1000)}
    test = [s.genotype for s in sample_architectures('test', 100)]
    assert not train.intersection(test)
    assert all(5 <= genotype_bucket(g) < 10 for g in test)
    assert all(genotype_bucket(g) >= 10 for g in train)


@pytest.mark.parametrize('split', [*SPLITS, 'predefined'])
def test_json_round_trip(split):
    for spec in sample_architectures(split, 2):
        text = spec.to_json()
        assert ArchSpec.from_json(text) == spec
        assert isinstance(spec.describe(), str) and spec.describe()


def test_split_rules():
    for spec in sample_architectures('deep', 10):
        assert 10 <= spec.n_cells <= 36 and spec.params_c32 <= 10**8
    for spec in sample_architectures('dense', 10):
        assert 2 <= len(spec.genotype.normal) // 2 <= 10
    for spec in sample_architectures('bnfree', 10):
        assert spec.norm is None
    for spec in sample_architectures('wide', 5):
        assert spec.C == 2 * spec.C_imagenet and spec.C // 4 in range(32, 129, 16)
    for spec in sample_architectures('train', 30):
        assert 4 <= spec.n_cells <= 18 and spec.params_c32 <= 10**7 and spec.C in range(32, 129, 16)


@pytest.mark.parametrize('split', sorted(SPLITS))
def test_forward_on_cifar_batch(split):
    for spec in _small_specs(split):
        model = ghnviz.create_model(spec, num_classes=10, is_imagenet_input=False).eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_count_params_matches_built_networks():
    for spec in sample_architectures('train', 4) + sample_architectures('dense', 2):
        for imagenet in (False, True):
            model = spec.build(num_classes=10, is_imagenet_input=imagenet, light=True)
            assert sum(p.numel() for p in model.parameters()) == spec.num_params(10, imagenet)
    assert count_params(DARTS, C=16, n_cells=8, num_classes=10, is_imagenet_input=False) == 246106


def test_predefined():
    resnet = ghnviz.create_model('deepnets1m:predefined/0', num_classes=10, is_imagenet_input=False)
    assert isinstance(resnet, torchvision.models.ResNet) and resnet.conv1.weight.shape == (64, 3, 3, 3)
    vit = sample_architecture('predefined', 1)
    assert (vit.C, vit.n_cells, vit.preproc, vit.C_mult) == (128, 12, False, 1)
    assert round(vit.num_params(10, False) / 1e6, 2) == 1.01
    assert round(vit.num_params(1000, True) / 1e6, 2) == 1.24


def test_resample_width_follows_the_rule():
    spec = min(sample_architectures('train', 20), key=lambda s: s.params_c32)
    widths = {spec.resample_width(np.random.default_rng(seed)).C for seed in range(40)}
    assert widths <= set(range(32, 129, 16)) and len(widths) > 1
    again = spec.resample_width(np.random.default_rng(3))
    assert again == spec.resample_width(np.random.default_rng(3)) and again.genotype == spec.genotype
    with pytest.raises(ValueError):
        sample_architecture('wide', 0).resample_width(np.random.default_rng(0))
