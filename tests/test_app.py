"""The Streamlit app, page by page, driven with streamlit's AppTest (no browser).

Every test drives the main interactions of a page with a real GHN file (the conformance GHN-2),
real torchvision models and, for fine-tuning, a real background run on the CIFAR-10 archive.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, shared_file

pytest.importorskip('streamlit')
from streamlit.testing.v1 import AppTest  # noqa: E402

from ghnviz.ui.state import MODEL_KEY, ModelSpec  # noqa: E402

TIMEOUT = 180  # seconds per script run (a cold graph trace or prediction on a busy CPU)


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture
def env(monkeypatch, tmp_path):
    ghn = shared_file('conformance', 'ghn2_cifar10_random.pt')
    monkeypatch.setenv('GHNVIZ_GHN', str(ghn))
    monkeypatch.setenv('GHNVIZ_HOME', str(tmp_path / 'home'))
    monkeypatch.setenv('GHNVIZ_EMBED_CACHE', str(tmp_path / 'embeddings'))
    monkeypatch.setenv('GHNVIZ_MAX_RUNS', '1')
    monkeypatch.delenv('GHNVIZ_ALLOW_CODE', raising=False)
    return {'ghn': ghn, 'tmp': tmp_path}


def _app(page: str | None = None, **state) -> AppTest:
    at = AppTest.from_file(str(ROOT / 'app.py'), default_timeout=TIMEOUT)
    for k, v in state.items():
        at.session_state[k] = v
    at.run()
    if page is not None:
        at.switch_page(page).run()
    _no_failure(at)
    return at


def _no_failure(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def _figure(at: AppTest, key: str) -> dict:
    charts = [c for c in at.get('plotly_chart') if c.key == key]
    assert charts, f'no chart {key!r}; charts: {[c.key for c in at.get("plotly_chart")]}'
    return json.loads(charts[0].proto.spec)


def _trace(fig: dict, name: str) -> dict:
    """A trace by name prefix, with plotly's base64 typed arrays decoded to numpy."""
    trace = next(t for t in fig['data'] if t.get('name', '').startswith(name))
    return {k: _decoded(v) for k, v in trace.items()}


def _decoded(v):
    if isinstance(v, dict) and 'bdata' in v:
        arr = np.frombuffer(base64.b64decode(v['bdata']), dtype=np.dtype(v['dtype']))
        return arr.reshape(v['shape']) if 'shape' in v and isinstance(v['shape'], list) else arr
    if isinstance(v, dict):
        return {k: _decoded(x) for k, x in v.items()}
    return v


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def _captions(at: AppTest) -> str:
    return '\n'.join(c.value for c in at.caption)


# ------------------------------------------------------------------------------------------------- home
def test_home_shows_the_loaded_ghn(env):
    at = _app()
    assert _errors(at) == []
    assert _metric(at, 'Architecture') == 'ghn2'
    assert _metric(at, 'Classes') == '10'
    assert _metric(at, 'Device') == 'cpu'
    assert 'ghn2_cifar10_random.pt' in _captions(at)  # sidebar status


def test_home_shows_the_shipped_ghn_card(env, monkeypatch):
    monkeypatch.delenv('GHNVIZ_GHN')
    card = json.loads((ROOT / 'assets' / 'ghn_default.json').read_text())
    at = _app()
    assert _errors(at) == []
    ev = card['evaluation']
    assert _metric(at, f'Mean top-1, {ev["n"]} test archs') == f'{ev["mean_top1"]:.1f}%'
    assert _metric(at, 'resnet18 (predicted)') == f'{ev["baselines"]["resnet18"]:.1f}%'
    assert _metric(at, 'Training steps') == f'{card["step"]:,}'
    fig = _figure(at, 'home_curve')
    acc = _trace(fig, 'training-batch accuracy')
    assert acc['x'][-1] == card['step'] and 0 < acc['y'][-1] < 100  # the curve reaches the shipped step


def test_home_without_a_ghn_lets_the_user_pick_a_file(env, monkeypatch):
    monkeypatch.setenv('GHNVIZ_GHN', str(env['tmp'] / 'missing.pt'))
    at = _app()
    assert any('Could not load the GHN' in e for e in _errors(at))
    assert 'not loaded' in _captions(at)
    at.radio(key='home_ghn_kind').set_value('File path').run()
    at.text_input(key='home_path').input(str(env['ghn'])).run()
    at.button(key='home_load').click().run()
    _no_failure(at)
    assert _errors(at) == []
    assert _metric(at, 'Architecture') == 'ghn2'
    at.switch_page('pages/2_Parameters.py').run()  # the choice holds on other pages
    assert _errors(at) == [] and at.button(key='params_predict')


# ------------------------------------------------------------------------------------------ architecture
def test_architecture_graph_and_its_controls(env):
    at = _app('pages/1_Architecture.py')
    assert _errors(at) == []
    fig = _figure(at, 'arch_graph')
    nodes = _trace(fig, 'nodes')
    assert len(nodes['x']) == int(_metric(at, 'Nodes')) == 52  # ResNet-18, 32x32 inputs
    assert None in _trace(fig, 'edges')['x']  # one line trace, None-separated
    assert 'conv' in {t['name'] for t in fig['data']}  # legend by op type

    at.text_input(key='arch_search').input('layer1').run()
    assert 'nodes match “layer1”' in _captions(at)
    assert len(_trace(_figure(at, 'arch_graph'), 'matches')['x']) == 8  # 2 blocks x (conv, bn) x 2

    at.slider(key='arch_fold').set_value(2).run()
    folded = _trace(_figure(at, 'arch_graph'), 'nodes')
    assert len(folded['x']) < 52
    assert any('(folded)' in t for t in folded['hovertext'])
    assert 'layer1.0' in folded['text']  # folded blocks are labelled

    at.slider(key='arch_fold').set_value(0).run()
    at.toggle(key='arch_virtual').set_value(True).run()
    assert any(t['name'].startswith('virtual edges') for t in _figure(at, 'arch_graph')['data'])

    at.selectbox(key='arch_color').set_value('weight std').run()
    marker = _trace(_figure(at, 'arch_graph'), 'nodes')['marker']
    assert marker['showscale'] and len(marker['color']) == 52 and np.isfinite(marker['color']).all()

    at.selectbox(key='arch_tv').set_value('mobilenet_v3_small').run()
    _no_failure(at)
    assert 'mobilenet_v3_small' in _captions(at)
    assert int(_metric(at, 'Nodes')) != 52
    assert at.session_state[MODEL_KEY].name == 'mobilenet_v3_small'
    assert [b.label for b in at.get('download_button')] == ['Graph as JSON', 'Graph as PNG', 'Graphviz DOT']


def test_architecture_deepnets(env):
    at = _app('pages/1_Architecture.py')
    at.segmented_control(key='arch_source').set_value('DeepNets-1M').run()
    at.selectbox(key='arch_split').set_value('test').run()
    at.number_input(key='arch_index').set_value(3).run()
    _no_failure(at)
    assert _errors(at) == []
    assert at.session_state[MODEL_KEY].name == 'deepnets1m:test/3'
    assert len(_trace(_figure(at, 'arch_graph'), 'nodes')['x']) == int(_metric(at, 'Nodes'))


GOOD_CODE = """
import torch
from torch import nn

class Pasted(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))
"""


def test_architecture_pasted_code(env, monkeypatch):
    at = _app('pages/1_Architecture.py')
    at.segmented_control(key='arch_source').set_value('Paste code').run()
    at.text_area(key='arch_code').input(GOOD_CODE).run()
    at.button(key='arch_check').click().run()
    _no_failure(at)
    assert _errors(at) == [], _errors(at)
    spec = at.session_state[MODEL_KEY]
    assert spec.source == 'pasted' and spec.name == 'Pasted'
    assert int(_metric(at, 'Nodes')) == len(_trace(_figure(at, 'arch_graph'), 'nodes')['x'])

    at.text_area(key='arch_code').input('class Broken(nn.Module)\n    pass\n').run()
    at.button(key='arch_check').click().run()
    assert any('syntax' in e for e in _errors(at))
    assert at.session_state[MODEL_KEY].name == 'Pasted'  # the last good model stays

    monkeypatch.setenv('GHNVIZ_CODE_TIMEOUT', '8')
    at.text_area(key='arch_code').input('while True:\n    pass\n').run()
    at.button(key='arch_check').click().run()
    _no_failure(at)
    assert any('timeout' in e for e in _errors(at))

    # the checked pasted model is fine-tuned in a background run, from its GHN-predicted parameters
    monkeypatch.setenv('GHNVIZ_DATA', str(shared_file('data', 'cifar10-jpeg.tar.xz')))
    at.switch_page('pages/3_Fine-tuning.py').run()
    assert 'Pasted model' in _captions(at)
    _launch_ghn_run(at, steps=2)
    deadline = time.monotonic() + 120
    while _history(at).iloc[0]['status'] in ('queued', 'running'):
        assert time.monotonic() < deadline, 'the pasted-model run did not finish'
        time.sleep(1)
        at.run()
    run = _history(at).iloc[0]
    assert run['status'] == 'done' and run['model'] == 'Pasted' and run['init'] == 'ghn'


def test_pasted_code_switched_off(env, monkeypatch):
    monkeypatch.setenv('GHNVIZ_ALLOW_CODE', '0')
    at = _app('pages/1_Architecture.py')
    at.segmented_control(key='arch_source').set_value('Paste code').run()
    assert any('switched off' in i.value for i in at.info)
    assert not at.text_area


# ------------------------------------------------------------------------------------------- parameters
def test_parameters_predict_stats_and_postprocessing(env):
    at = _app('pages/2_Parameters.py')
    assert any('Predict parameters' in i.value for i in at.info)
    at.button(key='params_predict').click().run()
    _no_failure(at)
    assert _errors(at) == []
    assert _metric(at, 'Predicted tensors') == '62' and _metric(at, 'Not predicted') == '0'
    assert _metric(at, 'Prediction time').endswith(' s')
    stats = at.dataframe[0].value
    assert len(stats) == 62 and {'std', 'init_std', 'diversity'} <= set(stats.columns)

    def hist():
        fig = _figure(at, 'params_hist')
        return np.array(_trace(fig, 'predicted')['y']), np.array(_trace(fig, 'post-processed')['y'])

    pred, post = hist()
    assert not np.allclose(pred, post)  # orthogonalised by default
    assert '20 of 21 layers' in _captions(at)
    at.checkbox(key='params_orth').uncheck().run()
    pred, post = hist()
    assert np.allclose(pred, post)  # nothing to do: no orthogonalisation, no noise
    at.select_slider(key='params_beta').set_value(1e-3).run()
    pred, post = hist()
    assert not np.allclose(pred, post)
    at.selectbox(key='params_preset').set_value('resnet50').run()  # orth, beta 3e-5, from layer 37
    assert at.checkbox(key='params_orth').value and at.number_input(key='params_layer').value == 37
    assert '0 of 21 layers' in _captions(at)
    spectrum = _figure(at, 'params_spectrum')
    assert {t['name'] for t in spectrum['data']} == {'predicted', 'post-processed', 'default init'}
    assert {t['name'] for t in _figure(at, 'params_per_layer_chart')['data']} >= {
        'predicted',
        'post-processed',
    }
    labels = [b.label for b in at.get('download_button')]
    assert 'Download predicted weights (.safetensors)' in labels

    at.switch_page('pages/1_Architecture.py').run()  # the graph can be coloured by the predicted weights
    at.selectbox(key='arch_color').set_value('weight std').run()
    assert 'Weight std of the predicted weights' in _captions(at)


def test_parameters_fill_toggle(env):
    at = _app('pages/2_Parameters.py', **{MODEL_KEY: ModelSpec('zoo', 'convnext_tiny', 32)})
    at.button(key='params_predict').click().run()
    _no_failure(at)
    skipped = int(_metric(at, 'Not predicted'))
    assert skipped > 0 and _metric(at, 'Filled by rules') == '0'  # layer scales have no graph node
    at.toggle(key='params_complete').set_value(True).run()
    assert any('Predict parameters' in i.value for i in at.info)  # a new setting: predict again
    at.button(key='params_predict').click().run()
    _no_failure(at)
    assert _metric(at, 'Not predicted') == '0' and int(_metric(at, 'Filled by rules')) == skipped
    filled = next(d.value for d in at.dataframe if 'rule' in d.value.columns)
    assert filled['rule'].str.contains('layer_scale').all()


def test_parameters_errors_are_messages(env, monkeypatch):
    at = _app('pages/2_Parameters.py', **{MODEL_KEY: ModelSpec('zoo', 'not_a_model', 32)})
    at.button(key='params_predict').click().run()
    _no_failure(at)
    assert any('Prediction failed' in e and 'unknown model' in e for e in _errors(at))
    monkeypatch.setenv('GHNVIZ_GHN', '/nonexistent/ghn.pt')
    at = _app('pages/2_Parameters.py')
    assert any('No GHN is loaded' in e for e in _errors(at))


# ------------------------------------------------------------------------------------------ fine-tuning
def _history(at: AppTest):
    frames = [d.value for d in at.dataframe if 'status' in d.value]
    return frames[0] if frames else None


def _launch_ghn_run(at: AppTest, steps: int) -> None:
    """Launch one 'ghn'-init run of `steps` steps from the Fine-tuning page's form."""
    at.multiselect(key='ft_inits').set_value(['ghn'])
    at.number_input(key='ft_steps').set_value(steps)
    at.number_input(key='ft_eval_limit').set_value(100)
    next(b for b in at.button if b.label == 'Launch runs').click().run()
    _no_failure(at)
    assert _errors(at) == []


def test_finetuning_launch_watch_cancel(env, monkeypatch):
    data = shared_file('data', 'cifar10-jpeg.tar.xz')
    monkeypatch.setenv('GHNVIZ_DATA', str(data))
    at = _app('pages/3_Fine-tuning.py')
    assert any('No runs yet' in i.value for i in at.info)
    assert at.text_input(key='ft_data').value == str(data)
    _launch_ghn_run(at, steps=3)
    hist = _history(at)
    assert hist is not None and len(hist) == 1
    run = hist.iloc[0]
    assert (
        run['init'] == 'ghn' and run['model'] == 'resnet18' and run['status'] in ('queued', 'running', 'done')
    )
    assert at.multiselect(key='ft_show').value == [int(run['id'])]
    assert {t['name'] for t in _figure(at, 'ft_loss_chart')['data']} <= {f'#{run["id"]} {run["name"]}'}

    cancel = [b for b in at.button if b.key == f'ft_cancel_{run["id"]}']
    if cancel:  # still active: cancel it, the runner stops its process
        cancel[0].click().run()
        deadline = time.monotonic() + 60
        while _history(at).iloc[0]['status'] not in ('cancelled', 'done', 'failed'):
            assert time.monotonic() < deadline, 'the run did not stop'
            time.sleep(1)
            at.run()
    assert _history(at).iloc[0]['status'] in ('cancelled', 'done')
    csv = next(b for b in at.get('download_button') if b.label.startswith('Export'))
    assert csv is not None


# ------------------------------------------------------------------------------------------- embeddings
def test_embeddings_against_a_reference_set(env):
    import ghnviz
    from ghnviz.embed import compute_reference

    ref = compute_reference(ghnviz.load_ghn(env['ghn']), n=24, batch_size=8)
    ref.save(env['tmp'] / 'embeddings')
    at = _app('pages/4_Embeddings.py')
    assert _errors(at) == []
    pct = float(_metric(at, 'Shift percentile'))
    assert 0 <= pct <= 100
    fig = _figure(at, 'emb_map')
    assert len(_trace(fig, 'training architectures')['x']) == 24
    assert len(_trace(fig, 'resnet18')['x']) == 1
    neighbours = next(d.value for d in at.dataframe if 'distance' in d.value)
    assert len(neighbours) == 10 and neighbours['distance'].is_monotonic_increasing
    at.slider(key='emb_k').set_value(5).run()
    assert len(_trace(_figure(at, 'emb_map'), '5 nearest')['x']) == 5
    first = neighbours['name'].iloc[0]
    at.button(key='emb_open').click().run()  # opens the nearest architecture on the Architecture page
    _no_failure(at)
    assert at.session_state[MODEL_KEY].name == f'deepnets1m:{first}'
    assert 'Architecture' in [t.value for t in at.title]


def test_embeddings_without_a_reference_set(env):
    at = _app('pages/4_Embeddings.py')
    assert any('No reference set' in i.value for i in at.info)
    assert at.button(key='emb_compute')
    assert Path(env['tmp'] / 'embeddings').exists() is False  # nothing computed unless asked
