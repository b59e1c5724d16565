"""Pasted model code: checked in a child process with limits, rebuilt in this process only when allowed."""

from __future__ import annotations

import json
import time

import pytest

from ghnviz.graph.build import build_graph
from ghnviz.zoo.pasted import (
    ALLOW_ENV,
    PastedCodeError,
    PastedLimits,
    PastedModel,
    _check,
    build_pasted,
    check_pasted,
)

GOOD = """
import torch
from torch import nn


class Helper(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


class Tiny(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = Helper(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        print('printed output must not break the reply channel')
        x = self.block(torch.relu(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))
"""
FAST = PastedLimits(timeout_s=60, cpu_s=60)


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def good() -> PastedModel:
    return check_pasted(GOOD, num_classes=7, input_size=(3, 16, 16), limits=FAST)


def test_good_code_is_checked_and_rebuilt(good):
    assert good.class_name == 'Tiny'  # the last nn.Module subclass defined
    assert good.output_shape == (2, 7)
    assert good.input_size == (3, 16, 16)
    assert good.warnings == []
    model = build_pasted(good)
    assert type(model).__name__ == 'Tiny'
    assert sum(p.numel() for p in model.parameters()) == good.n_params
    assert model.expected_input_sz == (3, 16, 16)
    graph = good.computation_graph()  # the child's graph equals the one traced here
    assert graph.signature() == build_graph(model).signature()
    assert {n.op for n in graph.nodes} >= {'conv', 'bn', 'sum'}
    assert PastedModel.from_json(good.to_json()) == good


def _in_process(source: str, class_name: str | None = None, num_classes: int = 10) -> dict:
    """The child's checking logic, run here without resource limits (fast; no process start)."""
    request = {
        'source': source,
        'class_name': class_name,
        'num_classes': num_classes,
        'input_size': [3, 16, 16],
    }
    return _check(request, apply_limits=False)


def test_class_name_and_class_count_warning():
    reply = _in_process(GOOD.replace('nn.Linear(8, num_classes)', 'nn.Linear(8, 5)'), class_name='Tiny')
    assert reply['ok'] and reply['class_name'] == 'Tiny' and reply['output_shape'] == [2, 5]
    assert 'classifier will not be predicted' in reply['warnings'][0]


def test_syntax_error_is_found_without_a_process():
    t0 = time.perf_counter()
    with pytest.raises(PastedCodeError) as e:
        check_pasted('class A(nn.Module)\n    pass\n')
    assert e.value.kind == 'syntax' and 'line 1' in e.value.message
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(
    'source, class_name, kind, text',
    [
        ('x = 1\n', None, 'no_module', 'defines no subclass'),
        (GOOD, 'Nope', 'no_module', '(defined: Helper, Tiny)'),
        ('raise ValueError("boom")\n', None, 'exec', 'ValueError at module level: boom'),
        (GOOD.replace('nn.Conv2d(3, 8', 'nn.Conv2d(4, 8'), None, 'forward', '(2, 3, 16, 16)'),
        (GOOD.replace('return self.fc(x.mean((2, 3)))', 'return x'), None, 'output', 'expected (2, classes)'),
        (
            GOOD.replace('def __init__(self, num_classes=10):', 'def __init__(self, depth, num_classes=10):'),
            None,
            'constructor',
            'Tiny() failed',
        ),
    ],
    ids=['no_module', 'unknown_class', 'exec', 'forward', 'output', 'constructor'],
)
def test_bad_code_gets_a_clear_error(source, class_name, kind, text):
    reply = _in_process(source, class_name)
    assert not reply['ok'] and reply['kind'] == kind, reply
    assert text in reply['message']


@pytest.mark.parametrize(
    'source, kind, text',
    [
        ('import not_a_real_package_xyz\n', 'import', "'not_a_real_package_xyz' is not installed"),
        ('import torch\nx = torch.empty(2**40, dtype=torch.uint8)\n', 'memory', 'memory'),
        ('import os\nos._exit(3)\n', 'crash', 'exit code 3'),
    ],
    ids=['import', 'memory', 'crash'],
)
def test_errors_cross_the_process_boundary(source, kind, text):
    with pytest.raises(PastedCodeError) as e:
        check_pasted(source, num_classes=10, input_size=(3, 16, 16), limits=FAST)
    assert e.value.kind == kind, e.value.message
    assert text in e.value.message


def test_endless_loop_times_out():
    t0 = time.perf_counter()
    with pytest.raises(PastedCodeError) as e:
        check_pasted('while True:\n    pass\n', limits=PastedLimits(timeout_s=6, cpu_s=60))
    assert e.value.kind == 'timeout'
    assert time.perf_counter() - t0 < 20


def test_switched_off(monkeypatch, good):
    monkeypatch.setenv(ALLOW_ENV, '0')
    with pytest.raises(PastedCodeError) as e:
        check_pasted(GOOD)
    assert e.value.kind == 'disabled'
    with pytest.raises(PastedCodeError):
        build_pasted(good)


def test_limits_from_env(monkeypatch):
    monkeypatch.setenv('GHNVIZ_CODE_TIMEOUT', '7.5')
    monkeypatch.setenv('GHNVIZ_CODE_MEMORY', '512')
    limits = PastedLimits.from_env()
    assert (limits.timeout_s, limits.cpu_s, limits.memory_mb) == (7.5, 7, 512)


def test_reply_is_plain_json(good):
    data = json.loads(good.to_json())  # everything crossing the process boundary is JSON data
    assert set(data) >= {'source', 'class_name', 'graph', 'n_params'}
    assert isinstance(data['graph']['nodes'], list)
