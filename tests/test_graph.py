"""build_graph against the conformance graphs, the graph views, op tables, odd models and bad input."""

from __future__ import annotations

import hashlib
import itertools
import json

import networkx as nx
import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import ghnviz
from ghnviz.graph.build import build_graph, virtual_edges
from ghnviz.graph.core import PRIMITIVES, ComputationGraph
from ghnviz.graph.ops_table import OP_TABLE, is_supported_param, module_rule, op_primitive

TORCHVISION = ['resnet18', 'resnet50', 'convnext_tiny', 'vit_b_16', 'efficientnet_b0', 'mobilenet_v3_small']
DARTS = 'deepnets1m:DARTS'
# fixture entry -> num_classes (the GHN-2 entry was built with dense=False, the GHN-3 one with dense=True;
# the graph itself does not depend on that flag)
VARIANTS = {'ghn2_cifar10/ghn3': 10, 'ghn3_tiny/ghn3': 1000}


pytestmark = pytest.mark.usefixtures('one_thread')


def _make(name: str, num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    if name == DARTS:
        try:
            from ghnviz.zoo.factory import create_model
        except ImportError:
            pytest.skip('ghnviz.zoo.factory.create_model is not available')
        return create_model(
            DARTS, num_classes=num_classes, C=16, n_cells=8, is_imagenet_input=num_classes == 1000
        )
    return torchvision.models.get_model(name, num_classes=num_classes)


_GRAPHS: dict[tuple[str, int], tuple[nn.Module, ComputationGraph]] = {}


def model_and_graph(name: str, num_classes: int) -> tuple[nn.Module, ComputationGraph]:
    """Built once per test session (models are the slow part)."""
    key = (name, num_classes)
    if key not in _GRAPHS:
        model = _make(name, num_classes)
        _GRAPHS[key] = (model, build_graph(model))
    return _GRAPHS[key]


def edges_sha256(adj: np.ndarray) -> str:
    src, dst = np.nonzero(adj)
    text = ''.join(f'{s},{t},{adj[s, t]};' for s, t in zip(src.tolist(), dst.tolist()))
    return hashlib.sha256(text.encode()).hexdigest()


def check_against(graph: ComputationGraph, exp: dict) -> None:
    assert [n.name for n in graph.nodes] == exp['node_names']
    assert [n.op for n in graph.nodes] == exp['primitives']
    assert graph.n_nodes == exp['n_nodes']
    assert graph.direct_edges.tolist() == exp['direct_edges']
    assert int(np.count_nonzero(graph.adj)) == exp['n_edges']
    assert int((graph.adj == 1).sum()) == exp['n_direct_edges']
    assert int(graph.adj.max()) == exp['max_edge_weight']
    assert edges_sha256(graph.adj) == exp['edges_sha256']


@pytest.mark.parametrize('variant', list(VARIANTS))
@pytest.mark.parametrize('name', [*TORCHVISION, DARTS])
def test_matches_reference_graph(expected, variant, name):
    _, graph = model_and_graph(name, VARIANTS[variant])
    check_against(graph, expected['results'][variant][name]['graph'])


def test_plain_forward_gives_same_graph(expected):
    """fast=False (real arithmetic, batch 2 as the reference) builds the same graph."""
    model, fast = model_and_graph('efficientnet_b0', 10)
    slow = build_graph(model, fast=False, batch_size=2)
    assert not slow.meta['shape_only'] and slow.meta['batch_size'] == 2
    assert fast.meta['shape_only']
    check_against(slow, expected['results']['ghn2_cifar10/ghn3']['efficientnet_b0']['graph'])


def test_node_fields():
    model, g = model_and_graph('resnet18', 10)
    params = dict(model.named_parameters())
    assert g.nodes[0].op == 'input' and g.nodes[0].param is None
    for node in g.nodes:
        if node.param is not None:
            assert node.shape == tuple(params[node.param].shape)
            assert node.lookup == node.param and node.module == node.param.rsplit('.', 1)[0]
    assert g.nodes[-2].is_cls_w and g.nodes[-2].param == 'fc.weight'
    assert g.nodes[-1].is_cls_b and g.nodes[-1].param == 'fc.bias'
    assert sum(n.is_cls_w or n.is_cls_b for n in g.nodes) == 2
    pool = [n for n in g.nodes if n.op == 'max_pool']
    assert len(pool) == 1 and pool[0].shape == (1, 1, 3, 3) and pool[0].lookup == 'max_pool'
    # norm biases have no node (the GHN predicts them with the norm weight); nothing else is missing
    assert set(g.meta['params_without_node']) == set(g.meta['norm_biases'])
    assert all(p.endswith('bias') and 'bn' in p or 'downsample.1' in p for p in g.meta['norm_biases'])
    # adjacency: topological order, virtual edges are shortest-path lengths
    assert (np.triu(g.adj, 1) == g.adj).all()
    assert (virtual_edges((g.adj == 1), 50) == g.adj).all()


def test_darts_cells():
    _, g = model_and_graph(DARTS, 10)
    assert {n.cell for n in g.nodes} == set(range(8))
    assert g.nodes[1].name == 'stem.0.weight' and g.nodes[1].cell == 0
    ops = [n for n in g.nodes if n.name == 'cells.0._ops.0.op.1.weight']
    assert ops and ops[0].cell == 0 and ops[0].lookup == 'cells.0._ops.0.op.1.weight'


def test_views():
    model, g = model_and_graph('resnet18', 10)
    s = g.summary()
    assert s['n_nodes'] == 53 and s['ops']['conv'] == 21 and s['ops']['bn'] == 20 and s['ops']['sum'] == 8
    assert sum(s['ops'].values()) == s['n_nodes'] and list(s['ops']) == [
        p for p in PRIMITIVES if p in s['ops']
    ]
    assert s['n_edges'] == int((g.adj == 1).sum()) and s['n_virtual_edges'] == int((g.adj > 1).sum())
    n_norm_bias = sum(m.bias.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert s['n_params_covered'] == sum(p.numel() for p in model.parameters()) - n_norm_bias
    assert s['n_tensors_without_node'] == 0
    assert s['depth'] == 46  # every node but the input and the 3 downsample conv+bn pairs is on one path

    G = g.to_networkx()
    assert isinstance(G, nx.DiGraph) and G.number_of_nodes() == 53 and G.number_of_edges() == s['n_edges']
    assert nx.is_directed_acyclic_graph(G) and G.nodes[1]['op'] == 'conv'
    assert not any(d['virtual'] for _, _, d in G.edges(data=True))
    Gv = g.to_networkx(virtual=True)
    assert Gv.number_of_edges() == int(np.count_nonzero(g.adj))
    assert max(d['length'] for _, _, d in Gv.edges(data=True)) == int(g.adj.max())

    data = json.loads(g.to_json())
    assert len(data['nodes']) == 53 and data['signature'] == g.signature()
    assert all(e[2] == 1 for e in data['edges'])
    back = ComputationGraph.from_dict(json.loads(g.to_json(virtual=True)))
    assert (back.adj == g.adj).all() and back.nodes == g.nodes

    dot = g.to_dot()
    assert dot.startswith('digraph') and dot.count('->') == s['n_edges']
    assert (
        '"conv\\nfc.weight\\n10x512"' in dot and '\\\\' not in dot
    )  # DOT line breaks, no escaped backslashes
    assert g.to_dot(virtual=True).count('->') == int(np.count_nonzero(g.adj))

    df = g.to_frame()
    assert len(df) == 53 and df.loc[0, 'op'] == 'input' and df['out_degree'].sum() == s['n_edges']


def test_signature():
    _, g10 = model_and_graph('resnet18', 10)
    _, g1000 = model_and_graph('resnet18', 1000)
    _, other = model_and_graph('resnet50', 10)
    assert g10.signature() == build_graph(_make('resnet18', 10)).signature()
    assert len({g10.signature(), g1000.signature(), other.signature()}) == 3


def test_model_and_rng_untouched():
    model = torchvision.models.resnet18(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    for fast in (True, False):
        build_graph(model, fast=fast)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training


class _ConvLSTM(nn.Module):
    """A CNN with an LSTM over image rows and a Conv1d: layers a GHN has no primitive for."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))  # (B, 8, H, W)
        x = self.conv1d(x.mean(2))  # (B, 8, W)
        x, _ = self.lstm(x.transpose(1, 2))  # (B, W, 16)
        return self.fc(x[:, -1])


def test_unsupported_layers_have_no_nodes():
    g = build_graph(_ConvLSTM(), input_size=(3, 16, 16))
    names = [n.name for n in g.nodes]
    # the mean over rows stays as a glob_avg node (no sigmoid/swish in the net, so it is no SE squeeze)
    assert names == [
        'input',
        'conv.weight',
        'conv.bias',
        'bn.weight',
        'MeanBackward1',
        'fc.weight',
        'fc.bias',
    ]
    assert [n.op for n in g.nodes] == ['input', 'conv', 'bias', 'bn', 'glob_avg', 'conv', 'bias']
    missing = set(g.meta['params_without_node'])
    assert {'conv1d.weight', 'conv1d.bias', 'lstm.weight_ih_l0', 'lstm.bias_hh_l0', 'bn.bias'} <= missing
    assert g.meta['norm_biases'] == ['bn.bias']
    assert g.direct_edges.tolist() == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 6]]


class _Tied(nn.Module):
    """One conv applied twice: its weight node feeds itself, so the graph has a cycle."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(self.conv(self.conv(x)).mean((2, 3)))


def test_cyclic_graph():
    g = build_graph(_Tied(), input_size=(3, 8, 8))
    # no topological order exists: nodes stay in discovery order (as the reference builder does)
    assert [n.name for n in g.nodes] == [
        'fc.weight',
        'MeanBackward1',
        'conv.weight',
        'conv.bias',
        'fc.bias',
        'input',
    ]
    assert g.summary()['depth'] == 3  # conv weight+bias (one component) -> mean -> fc.weight -> fc.bias
    assert len(g.to_frame()) == 6 and not nx.is_directed_acyclic_graph(g.to_networkx())


def _capped_paths(A, src, dst, limit=2):
    G = nx.DiGraph([(int(i), int(j)) for i, j in zip(*np.nonzero(A))])
    if src not in G or dst not in G:
        return 0
    return len(list(itertools.islice(nx.all_simple_paths(G, src, dst), limit)))


def test_path_count_exact_on_random_graphs():
    from ghnviz.graph.passes import _count_paths

    rng = np.random.default_rng(0)
    cyclic = 0
    for _ in range(300):
        n = int(rng.integers(3, 9))
        A = rng.random((n, n)) < 0.3
        np.fill_diagonal(A, False)
        cyclic += not nx.is_directed_acyclic_graph(nx.DiGraph(A))
        src, dst = (int(v) for v in rng.choice(n, 2, replace=False))
        for limit in (1, 2, 3):
            assert _count_paths(A, src, dst, limit) == _capped_paths(A, src, dst, limit)
    assert cyclic > 50  # both kinds of graph were exercised


def test_path_count_dead_end_cycles_stay_fast():
    # src -> gate -> dst, and the gate also feeds 18 nodes that all point at each other and back at the
    # gate: every walk into the clique is a dead end (the gate is already on the path). Plain search
    # would enumerate all simple paths of the clique; the guarded search answers at once.
    from ghnviz.graph.passes import _count_paths

    n = 21
    src, gate, dst, clique = 0, 1, 2, range(3, 21)
    A = np.zeros((n, n), dtype=bool)
    A[src, gate] = A[gate, dst] = True
    for i in clique:
        A[gate, i] = A[i, gate] = True
        for j in clique:
            A[i, j] = i != j
    assert _count_paths(A, src, dst) == 1
    A[src, 3] = True  # a second way in: src -> 3 -> gate -> dst
    assert _count_paths(A, src, dst) == 2


def test_bad_input():
    with pytest.raises(ValueError, match='expects a torch.nn.Module'):
        build_graph(torchvision.models.resnet18)  # the constructor, not a model
    with pytest.raises(ValueError, match='has no parameters'):
        build_graph(nn.ReLU())
    mlp = nn.Sequential(nn.Linear(10, 5))
    with pytest.raises(ValueError, match=r'failed on a random input of shape \(2, 3, 224, 224\).*input_size'):
        build_graph(mlp)
    frozen = nn.Conv2d(3, 4, 3).requires_grad_(False)
    with pytest.raises(ValueError, match='does not depend on any parameter'):
        build_graph(frozen)

    class NoTensor(nn.Conv2d):
        def forward(self, x):
            return 'logits'

    with pytest.raises(ValueError, match='returned no tensor'):
        build_graph(NoTensor(3, 4, 3))


def test_input_size_and_get_var():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 2))
    g = build_graph(mlp, input_size=(3, 2, 2))
    assert [n.name for n in g.nodes] == ['input', '1.weight', '1.bias', '3.weight', '3.bias']

    class WithVar(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

        def get_var(self):
            return self(torch.ones(1, 4))

    g = build_graph(WithVar())
    assert [n.op for n in g.nodes] == ['input', 'conv', 'bias']


def test_ve_cutoff():
    model, g = model_and_graph('resnet18', 10)
    assert build_graph(model, ve_cutoff=1).adj.max() == 1
    g5 = build_graph(model, ve_cutoff=5)
    assert g5.adj.max() == 5 and ((g5.adj > 0) & (g5.adj <= 5) == (g.adj > 0) & (g.adj <= 5)).all()


def test_op_tables():
    assert module_rule(nn.Conv2d(4, 4, 3))(nn.Conv2d(4, 4, 3), 'a.weight') == 'conv'
    assert module_rule(nn.Conv2d(4, 4, 3, groups=4))(nn.Conv2d(4, 4, 3, groups=4), 'a.weight') == 'sep_conv'
    dil = nn.Conv2d(4, 4, 3, groups=4, dilation=2)
    assert module_rule(dil)(dil, 'a.weight') == 'dil_conv' and module_rule(dil)(dil, 'a.bias') == 'bias'
    assert module_rule(torchvision.models.convnext.LayerNorm2d(4))(None, 'x.weight') == 'ln'
    assert module_rule(nn.MultiheadAttention(8, 2))(None, 'in_proj_weight') == 'conv'
    assert module_rule(nn.Embedding(3, 4))(None, 'weight') == 'pos_enc'
    assert module_rule(nn.Conv1d(3, 4, 3)) is None and module_rule(nn.LSTM(3, 4)) is None
    assert not is_supported_param(nn.BatchNorm2d(4), 'bn.bias') and is_supported_param(
        nn.BatchNorm2d(4), 'bn.weight'
    )

    class MyConv(nn.Conv2d):  # subclasses are typed like their base
        pass

    assert module_rule(MyConv(3, 4, 3)) is not None
    assert op_primitive('MaxPool2DWithIndicesBackward0') == 'max_pool'
    assert op_primitive('MeanBackward1') == 'glob_avg' and op_primitive('SoftmaxBackward0') == 'msa'
    assert op_primitive('AddmmBackward0') == 'sum'  # unknown ops kept as merge points
    assert set(OP_TABLE.values()) <= set(PRIMITIVES)


def test_public_api():
    assert ghnviz.build_graph is build_graph
