"""The app in a real browser: `streamlit run app.py` driven by Debian's Chromium through Playwright.

The main path: pick ResNet-18 -> its graph appears -> predict -> the statistics appear -> launch a
20-step fine-tuning run -> its training curve appears. Screenshots go to ``test-artifacts/browser/``.
Needs the ``playwright`` package and ``/usr/bin/chromium`` (``apt-get install chromium``); the
browser is never downloaded.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, shared_file

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]

CHROMIUM = os.environ.get('GHNVIZ_CHROMIUM', '/usr/bin/chromium')
CHROMIUM_ARGS = [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
]
ARTIFACTS = ROOT / 'test-artifacts' / 'browser'
START_TIMEOUT_S = 120  # server start (imports torch) on a busy machine
RUN_TIMEOUT_S = 600  # a 20-step ResNet-18 run on CPU, data loading included


# JavaScript: number of points of a trace (plotly sends numpy arrays as base64 typed arrays)
JS_POINTS = (
    '(t) => { const x = t.x; if (!x) return 0;'
    ' if (Array.isArray(x) || ArrayBuffer.isView(x)) return x.length;'
    ' const size = {f8: 8, f4: 4, i4: 4, u4: 4, i2: 2, u2: 2, i1: 1, u1: 1}[x.dtype] || 8;'
    ' return x.bdata ? atob(x.bdata).length / size : 0; }'
)


def _points(pg, key: str, trace: str | int) -> int:
    """Points of a trace (by name or index) of the plotly chart with widget key ``key`` (-1: no chart)."""
    return pg.evaluate(
        f"""([key, trace]) => {{ const n = {JS_POINTS};
        const g = document.querySelector('.st-key-' + key + ' .js-plotly-plot');
        if (!g || !g.data) return -1;
        const t = typeof trace === 'number' ? g.data[trace] : g.data.find(d => d.name === trace);
        return t ? n(t) : -1; }}""",
        [key, trace],
    )


def _wait_points(pg, key: str, trace: str | int, at_least: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while (n := _points(pg, key, trace)) < at_least:
        assert time.monotonic() < deadline, f'{key}: {n} points after {timeout_s} s, expected {at_least}'
        time.sleep(1)
    return n


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    """A headless `streamlit run app.py` on a free port, pointed at test fixtures and a fresh run store."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f'{CHROMIUM} is absent (apt-get install chromium)')
    pytest.importorskip('playwright.sync_api')
    tmp = tmp_path_factory.mktemp('browser')
    port = _free_port()
    env = dict(os.environ)
    env.update(
        GHNVIZ_GHN=str(shared_file('conformance', 'ghn2_cifar10_random.pt')),
        GHNVIZ_DATA=str(shared_file('data', 'cifar10-jpeg.tar.xz')),
        GHNVIZ_HOME=str(tmp / 'home'),
        GHNVIZ_EMBED_CACHE=str(tmp / 'embeddings'),
        GHNVIZ_MAX_RUNS='1',
        PYTHONUNBUFFERED='1',
    )
    log = open(tmp / 'server.log', 'wb')
    cmd = [
        sys.executable, '-m', 'streamlit', 'run', 'app.py',
        '--server.headless', 'true', '--server.port', str(port), '--server.address', '127.0.0.1',
        '--browser.gatherUsageStats', 'false', '--server.fileWatcherType', 'none',
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f'http://127.0.0.1:{port}'
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f'{url}/_stcore/health', timeout=2) as r:
                if r.read().strip() == b'ok':
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f'streamlit did not start: {(tmp / "server.log").read_text()[-2000:]}')
        time.sleep(0.5)
    yield {'url': url, 'tmp': tmp, 'env': env}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()
    _stop_runs(tmp / 'home' / 'runs.sqlite')


def _stop_runs(db: Path) -> None:
    """Runs outlive the server (their own process groups): stop any still active."""
    if not db.exists():
        return
    from ghnviz import runner
    from ghnviz.runs import RunStore

    with RunStore(db) as store:
        for run in store.list_runs(('queued', 'running')):
            runner.cancel(store, run.id, grace_s=2, term_grace_s=2)


@pytest.fixture(scope='module')
def page(server, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    profile = tmp_path_factory.mktemp('chromium-profile')  # a new, empty user data dir
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={'width': 1400, 'height': 1000},
        )  # fmt: skip
        pg = context.new_page()
        pg.set_default_timeout(120_000)
        yield pg
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


def _idle(pg, timeout_s: float = 180) -> None:
    """Wait until the script run triggered by the last action has finished."""
    time.sleep(0.8)
    pg.wait_for_selector(
        '[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout_s * 1000
    )
    time.sleep(0.4)


def _no_failures(pg) -> None:
    assert pg.locator('[data-testid="stException"]').count() == 0
    errors = pg.locator('[data-testid="stAlertContentError"]')
    assert errors.count() == 0, errors.all_inner_texts()


def _shot(pg, name: str) -> None:
    pg.screenshot(path=str(ARTIFACTS / f'{name}.png'), full_page=True)


def _go(pg, label: str) -> None:
    pg.get_by_test_id('stSidebar').get_by_role('link', name=label).click()
    _idle(pg)


def test_main_path(server, page):
    pg = page
    pg.goto(server['url'] + '/Architecture')
    _idle(pg)
    # pick ResNet-18 in the searchable selectbox
    box = pg.get_by_test_id('stSelectbox').filter(has_text='torchvision model')
    box.click()
    pg.keyboard.type('resnet18')
    pg.keyboard.press('Enter')
    _idle(pg)
    assert box.locator('input').input_value() == 'resnet18'
    pg.locator('.st-key-arch_graph .js-plotly-plot').wait_for(state='visible')
    assert _wait_points(pg, 'arch_graph', 'nodes', 52, 60) == 52
    assert pg.get_by_test_id('stMetric').filter(has_text='Nodes').inner_text().split()[-1] == '52'
    _no_failures(pg)
    _shot(pg, '1_architecture')

    _go(pg, 'Parameters')
    pg.get_by_role('button', name='Predict parameters').click()
    _idle(pg)
    pg.get_by_text('Per-layer statistics').wait_for()
    assert pg.get_by_test_id('stDataFrame').first.is_visible()
    assert pg.get_by_test_id('stMetric').filter(has_text='Predicted tensors').inner_text().split()[-1] == '62'
    pg.locator('.st-key-params_hist .js-plotly-plot').wait_for(state='visible')
    _no_failures(pg)
    _shot(pg, '2_parameters')

    _go(pg, 'Fine-tuning')
    inits = pg.get_by_test_id('stMultiSelect').filter(has_text='Initialisations')
    inits.get_by_role('button', name='Remove default').click()
    steps = pg.get_by_label('Steps', exact=True)
    steps.fill('20')
    pg.get_by_label('Test images').fill('100')
    pg.get_by_role('button', name='Launch runs').click()
    _idle(pg)
    _no_failures(pg)
    # the fragment polls the run store: a loss curve appears, then grows to 20 steps
    _wait_points(pg, 'ft_loss_chart', 0, 1, RUN_TIMEOUT_S)
    _shot(pg, '3_finetuning_running')
    assert _wait_points(pg, 'ft_loss_chart', 0, 20, RUN_TIMEOUT_S) == 20
    deadline = time.monotonic() + 120
    while pg.get_by_test_id('stProgress').count():  # the run's progress bar goes when it ends
        assert time.monotonic() < deadline, 'the run did not finish'
        time.sleep(1)
    _idle(pg)
    assert _points(pg, 'ft_acc_chart', 0) >= 2  # evaluated at the start and at the end
    _no_failures(pg)
    _shot(pg, '4_finetuning_done')
