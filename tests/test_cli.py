"""The `python -m ghnviz` command line: predict, graph and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, shared_file
from safetensors.torch import load_file

import ghnviz
from ghnviz.cli import main


def test_predict_writes_the_predicted_parameters(tmp_path, capsys):
    ghn_file = shared_file('conformance', 'ghn2_cifar10_random.pt')
    out = tmp_path / 'r18.safetensors'
    assert main(['predict', '--ghn', str(ghn_file), '--model', 'resnet18', '--out', str(out)]) == 0
    table = capsys.readouterr().out
    assert 'resnet18 (10 classes)' in table
    assert '62 tensors, 11,181,642 of 11,181,642 parameters' in table
    saved = load_file(str(out))

    # the same prediction through the library gives the same tensors
    model = ghnviz.create_model('resnet18', num_classes=10)
    ghnviz.load_ghn(str(ghn_file)).predict(model)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(saved[name], p, rtol=0, atol=0)


def test_predict_without_class_layers_lists_them_as_skipped(capsys):
    ghn_file = shared_file('conformance', 'ghn2_cifar10_random.pt')
    assert main(['predict', '--ghn', str(ghn_file), '--model', 'resnet18', '--no-class-layers']) == 0
    table = capsys.readouterr().out
    assert 'skipped            2 tensors' in table
    assert 'fc.weight' in table and 'fc.bias' in table


@pytest.mark.parametrize('fmt', ['json', 'dot'])
def test_graph_export(fmt, tmp_path):
    out = tmp_path / f'g.{fmt}'
    assert main(['graph', '--model', 'resnet18', '--format', fmt, '--out', str(out)]) == 0
    text = out.read_text()
    graph = ghnviz.build_graph(ghnviz.create_model('resnet18'))
    if fmt == 'json':
        data = json.loads(text)
        assert len(data['nodes']) == graph.n_nodes
    else:
        assert text.startswith('digraph')
        assert text.count(' -> ') >= len(graph.direct_edges)


@pytest.mark.parametrize(
    'args, needle',
    [
        (['predict', '--ghn', '/no/such/file.pt', '--model', 'resnet18'], 'no such file'),
        (['graph', '--model', 'resnet1000'], "unknown model 'resnet1000'"),
    ],
)
def test_errors_are_one_line(args, needle):
    proc = subprocess.run(
        [sys.executable, '-m', 'ghnviz', *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
