"""Embeddings page: where the model's GHN embedding falls against the GHN's training distribution."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from ghnviz.ui import charts, loaders, page, state
from ghnviz.ui.errors import guard, show_error

METHODS = {'PCA': 'pca', 'UMAP': 'umap', 't-SNE': 'tsne'}
# colour option -> reference column
PROPERTIES = {
    'parameters (log10)': 'log_params',
    'depth': 'depth',
    'nodes': 'n_nodes',
    'average degree': 'avg_degree',
    'cells': 'n_cells',
}
SIZES = [100, 500, 2000]
POLL_S = 2.0


@st.cache_resource(show_spinner='Hashing the GHN…', max_entries=8)
def _ghn_sha(source: str, device: str) -> str:
    from ghnviz.embed import ghn_hash

    return ghn_hash(loaders.load_ghn_cached(source, device))


def _start_job(ghn_path: str, n: int) -> None:
    """Compute a reference set in a separate process (the `ghnviz embed reference` command)."""
    log = Path(tempfile.gettempdir()) / f'ghnviz-embed-{os.getpid()}-{int(time.time())}.log'
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env['PYTHONPATH'] = os.pathsep.join(p for p in (root, env.get('PYTHONPATH')) if p)
    cmd = [sys.executable, '-m', 'ghnviz', 'embed', 'reference', '--ghn', ghn_path, '--n', str(n)]
    with open(log, 'ab') as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    st.session_state['emb_job'] = {'proc': proc, 'log': str(log), 'n': n, 'started': time.time()}


def _job_panel() -> None:
    job = st.session_state.get('emb_job')
    if job is None:
        return
    code = job['proc'].poll()
    elapsed = time.time() - job['started']
    if code is None:
        c1, c2 = st.columns([5, 1])
        c1.info(f'Embedding {job["n"]} training architectures in a separate process… {elapsed:.0f} s')
        if c2.button('Stop', key='emb_stop'):
            job['proc'].terminate()
        return
    st.session_state.pop('emb_job', None)
    if code != 0:
        tail = (
            Path(job['log']).read_text(errors='replace').strip().splitlines()[-5:]
            if Path(job['log']).exists()
            else []
        )
        show_error('Computing the reference set failed', f'exit code {code}: ' + ' '.join(tail)[-600:], '')
    st.rerun(scope='app')


def _compute_controls(ghn_path: str | None, have: int) -> None:
    if ghn_path is None:
        st.caption('The loaded GHN has no file, so a reference set cannot be computed in the background.')
        return
    c1, c2 = st.columns([2, 3])
    options = [n for n in SIZES if n > have] or SIZES[-1:]
    n = c1.selectbox(
        'Architectures', options, key='emb_n', help='More gives steadier percentiles (2,000: minutes)'
    )
    c2.caption(f'Or on the command line: `python -m ghnviz embed reference --ghn {ghn_path} --n {n}`')
    if c1.button('Compute', key='emb_compute', disabled='emb_job' in st.session_state):
        _start_job(ghn_path, int(n))
        st.rerun()


def _report(ghn, spec: state.ModelSpec, ref, k: int):
    from ghnviz.embed import distribution_shift

    key = (spec.key, state.ghn_source(), ref.key, str(ref.path), k)
    cached = st.session_state.get('emb_report')
    if cached is not None and cached[0] == key:
        return cached[1]
    model = loaders.make_model(spec, ghn.num_classes).eval()
    report = distribution_shift(ghn, model, k=k, reference=ref)
    st.session_state['emb_report'] = (key, report)
    return report


def _shift_section(ghn, spec: state.ModelSpec, ref) -> None:
    from ghnviz.embed import projection

    c = st.columns([2, 2, 2])
    method = c[0].segmented_control('Projection', list(METHODS), default='PCA', key='emb_method') or 'PCA'
    prop = c[1].selectbox('Colour training architectures by', list(PROPERTIES), key='emb_color')
    k = c[2].slider('Neighbours (k)', 1, max(1, min(50, len(ref) - 1)), min(10, len(ref) - 1), key='emb_k')
    with st.spinner('Embedding the model…'), guard('Could not embed the model', 'Choose another model.'):
        report = _report(ghn, spec, ref, int(k))
    m = st.columns(4)
    m[0].metric(
        'Shift percentile',
        f'{report.percentile:.0f}',
        help=f'Share of training architectures whose {k} nearest others are closer than this model’s',
    )
    m[1].metric(f'Mean distance to {k} nearest', f'{report.distance:.2f}', help=report.metric)
    m[2].metric(
        'Mahalanobis distance',
        f'{report.mahalanobis:.1f}',
        help='to the training mean (Ledoit-Wolf covariance)',
    )
    m[3].metric('Mahalanobis percentile', f'{report.mahalanobis_percentile:.0f}')
    verdict = (
        'typical of'
        if report.percentile <= 75
        else 'at the edge of'
        if report.percentile <= 95
        else 'outside'
    )
    st.markdown(f'**{spec.name}** looks {verdict} what this GHN was trained on.')
    if report.matches:
        st.caption('Same graph as training architectures: ' + ', '.join(report.matches[:10]))
    with st.spinner(f'Fitting {method}…'), guard(f'Could not compute the {method} map', 'Try PCA.'):
        proj = projection(ref, METHODS[method])
        ref_xy, model_xy = proj.place(report.embedding[None])
    values = np.asarray(ref.column(PROPERTIES[prop]), dtype=float)
    hover = [
        f'<b>{name}</b><br>{desc[:120]}<br>{int(p):,} params, {int(d)} deep'
        for name, desc, p, d in zip(
            ref.table['name'], ref.table['description'], ref.table['num_params'], ref.table['depth']
        )
    ]
    fig = charts.embedding_figure(
        ref_xy,
        values,
        prop,
        hover,
        model_xy,
        spec.name,
        [nb.index for nb in report.neighbours],
        title=f'{method} of {len(ref)} training architectures',
    )
    st.plotly_chart(fig, key='emb_map')
    st.subheader('Nearest training architectures')
    table = pd.DataFrame(
        [
            {
                'name': nb.name,
                'distance': round(nb.distance, 3),
                'params': nb.num_params,
                'nodes': nb.n_nodes,
                'depth': nb.depth,
                'avg degree': round(nb.avg_degree, 2),
                'description': nb.description,
            }
            for nb in report.neighbours
        ]
    )
    st.dataframe(table, hide_index=True, key='emb_neighbours')
    c1, c2 = st.columns([3, 1])
    pick = c1.selectbox(
        'Open a neighbour on the Architecture page', [nb.name for nb in report.neighbours], key='emb_pick'
    )
    if c2.button('Open', key='emb_open') and pick:
        state.set_model(state.ModelSpec(state.ZOO, f'deepnets1m:{pick}', spec.image_size))
        st.switch_page('pages/1_Architecture.py')


def main() -> None:
    st.title('Embeddings')
    if importlib.util.find_spec('ghnviz.embed') is None:
        st.info(
            'GHN embeddings against the training distribution are not available in this build '
            '(the `ghnviz.embed` module is missing). The other pages work without it.',
            icon=':material/info:',
        )
        return
    from ghnviz.embed import find_reference

    spec = state.current_model()
    ghn, err = loaders.current_ghn()
    if ghn is None:
        show_error('No GHN is loaded', err, 'Choose a GHN checkpoint on the Home page.')
        return
    st.caption(f'Model: **{spec.label}** (change it on the Architecture page)')
    ghn_path = None
    try:
        ghn_path = loaders.ghn_resolved_path(state.ghn_source())
    except Exception:  # noqa: BLE001 - only needed to compute a set in the background
        pass
    sha = _ghn_sha(state.ghn_source(), state.ghn_device())
    ref = find_reference(sha, n=None)
    running = 'emb_job' in st.session_state
    st.fragment(_job_panel, run_every=POLL_S if running else None)()
    if ref is None:
        st.info(
            'No reference set for this GHN yet: the graph embeddings of DeepNets-1M training architectures '
            'that this model is compared with. Compute one (in the background):'
        )
        _compute_controls(ghn_path, 0)
        return
    st.caption(
        f'Reference: {len(ref):,} `{ref.meta.get("split")}` architectures embedded by this GHN '
        f'(`{ref.path.name if ref.path else "in memory"}`)'
    )
    with st.expander('Compute a larger reference set'):
        _compute_controls(ghn_path, len(ref))
    if len(ref) < 3:
        st.warning('The reference set is too small to score against.')
        return
    _shift_section(ghn, spec, ref)


page.run('Embeddings', main)
