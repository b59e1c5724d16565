"""Parameters page: predict the model's parameters, inspect their statistics, post-process them."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import streamlit as st

from ghnviz.ui import charts, loaders, page, state
from ghnviz.ui.errors import guard, show_error

BETAS = [0.0, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
TABLE_COLUMNS = [
    'name',
    'module_type',
    'shape',
    'numel',
    'mean',
    'std',
    'init_std',
    'norm',
    'near_zero',
    'eff_rank',
    'cond',
    'diversity',
    'init_diversity',
]
# post-processing widget -> initial value
DEFAULTS = {'params_orth': True, 'params_beta': 0.0, 'params_layer': 0, 'params_max_sz': 0, 'params_seed': 0}
# per-layer chart option -> stats column
PER_LAYER = {
    'filter diversity': 'diversity',
    'effective rank': 'eff_rank',
    'std': 'std',
    'largest singular value': 'sv_max',
}


def _state_dict_bytes(model) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()})


def _predict(ghn, spec: state.ModelSpec, key: tuple, complete: bool) -> None:
    t0 = time.perf_counter()
    model = loaders.make_model(spec, ghn.num_classes)
    built = time.perf_counter() - t0
    pred = ghn.predict(model, complete=complete)
    model.cpu()
    st.session_state['params_result'] = {
        'key': key,
        'model': model,
        'predicted': list(pred.predicted),
        'filled': dict(pred.filled),
        'skipped': dict(pred.skipped),
        'seconds': {'build model': built, **pred.seconds},
        'stats': None,  # computed on first display, after the prediction is shown
    }
    st.session_state.pop('params_post', None)


def _apply_preset() -> None:
    from ghnviz.postprocess import PRESETS

    preset = PRESETS.get(st.session_state.get('params_preset'))
    if preset:
        st.session_state['params_orth'] = bool(preset['orth'])
        st.session_state['params_beta'] = min(BETAS, key=lambda b: abs(b - preset['beta']))
        st.session_state['params_layer'] = int(preset['layer'])


def _postprocess(result: dict, settings: tuple) -> dict:
    """Post-process a copy of the predicted model (cached per settings in the session)."""
    from ghnviz.postprocess import postprocess
    from ghnviz.stats import tensor_stats

    post = st.session_state.get('params_post')
    if post is not None and post['key'] == (result['key'], settings):
        return post
    orth, beta, layer, max_sz, seed = settings
    res = postprocess(
        result['model'],
        orth=orth,
        beta=beta,
        layer=layer,
        max_sz=max_sz,
        seed=seed,
        inplace=False,
        exact=False,
    )
    params = dict(res.model.named_parameters())
    names = [n for n in result['stats'].loc[result['stats']['ndim'] >= 2, 'name']]
    per_layer = tensor_stats([params[n] for n in names])
    per_layer.insert(0, 'name', names)
    post = {'key': (result['key'], settings), 'model': res.model, 'records': res.frame(), 'stats': per_layer}
    st.session_state['params_post'] = post
    return post


def _matrix(t) -> np.ndarray:
    return t.detach().cpu().double().reshape(t.shape[0], -1).numpy()


def _svd(t) -> np.ndarray:
    import torch

    m = t.detach().cpu().double().reshape(t.shape[0], -1)
    return torch.linalg.svdvals(m).numpy()


def _results(result: dict, spec: state.ModelSpec, num_classes: int) -> None:
    secs = result['seconds']
    c = st.columns(5)
    c[0].metric('Predicted tensors', len(result['predicted']))
    c[1].metric('Filled by rules', len(result['filled']), help='tensors without a graph node (toggle above)')
    c[2].metric('Not predicted', len(result['skipped']))
    c[3].metric('Prediction time', f'{secs.get("total", 0):.2f} s', help='graph + GHN forward + writing')
    c[4].metric('GHN forward', f'{secs.get("predict", 0):.3f} s', help=f'graph: {secs.get("graph", 0):.3f} s')
    lists = (
        ('filled', 'rule', 'tensors filled by a labelled rule (not by the GHN)'),
        ('skipped', 'why', 'tensors kept their default init'),
    )
    for what, column, title in lists:
        if result[what]:
            with st.expander(f'{len(result[what])} {title}'):
                st.dataframe(
                    pd.DataFrame(list(result[what].items()), columns=['parameter', column]),
                    hide_index=True,
                    key=f'params_{what}',
                )
    if result['stats'] is None:
        from ghnviz.stats import weight_stats

        with st.spinner('Computing weight statistics…'):
            result['stats'] = weight_stats(result['model'])
    stats = result['stats']
    st.subheader('Per-layer statistics')
    st.caption(
        'Predicted weights; `init_*` columns: the same layer with its default PyTorch initialisation. '
        'Click a header to sort.'
    )
    table = stats[[c for c in TABLE_COLUMNS if c in stats]].copy()
    table['shape'] = table['shape'].map(lambda s: '×'.join(map(str, s)))
    st.dataframe(table, hide_index=True, key='params_stats', height=360)

    st.subheader('Post-processing')
    from ghnviz.postprocess import PRESETS

    n2d = int((stats['ndim'] >= 2).sum())
    c = st.columns([2, 1.3, 2, 1, 1, 1], vertical_alignment='bottom')
    c[0].selectbox(
        'Preset',
        ['custom', *PRESETS],
        key='params_preset',
        on_change=_apply_preset,
        help='Settings of the published fine-tuning recipes (orthogonalisation from layer 37 for ResNet-50, '
        '94 for ConvNeXt-Base; GHN-3 adds noise only).',
    )
    for k, v in DEFAULTS.items():  # widget values live in session state (presets write them there)
        st.session_state.setdefault(k, v)
    orth = c[1].checkbox('Orthogonalise', key='params_orth')
    beta = c[2].select_slider('Noise β', BETAS, key='params_beta', format_func=lambda b: f'{b:g}')
    layer = c[3].number_input(
        'From layer',
        min_value=0,
        max_value=10_000,
        step=1,
        key='params_layer',
        help=f'Layers are numbered 1…{n2d}; earlier ones are kept',
    )
    max_sz = c[4].number_input(
        'max_sz',
        min_value=0,
        max_value=4096,
        step=1,
        key='params_max_sz',
        help='only layers with max(out, in) > max_sz',
    )
    seed = c[5].number_input('Seed', min_value=0, max_value=2**31 - 1, step=1, key='params_seed')
    settings = (bool(orth), float(beta), int(layer), int(max_sz), int(seed))
    with st.spinner('Post-processing…'):
        post = _postprocess(result, settings)
    records = post['records']
    changed = records[~records['action'].str.startswith('skipped')]
    st.caption(
        f'{len(changed)} of {len(records)} layers with ≥2-D weights changed (the classifier never is).'
    )

    model, pmodel = result['model'], post['model']
    params, pparams = dict(model.named_parameters()), dict(pmodel.named_parameters())
    names2d = list(stats.loc[stats['ndim'] >= 2, 'name'])
    changed_w = [f'{n}.weight' for n in changed['name']]
    default_layer = next((n for n in changed_w if n in params), names2d[0] if names2d else None)
    if default_layer is None:
        st.info('This model has no weight matrices to post-process.')
        return
    c1, c2 = st.columns([3, 1])
    layer_name = c1.selectbox('Layer', names2d, index=names2d.index(default_layer), key='params_layer_name')
    st.session_state.setdefault('params_show_init', True)
    show_init = c2.checkbox('Show default init', key='params_show_init')
    init_model = None
    if show_init:
        init_model = loaders.make_model(spec, num_classes, seed=1)
    iparams = dict(init_model.named_parameters()) if init_model is not None else {}
    hist = {
        'predicted': _matrix(params[layer_name]).ravel(),
        'post-processed': _matrix(pparams[layer_name]).ravel(),
    }
    spec_sv = {'predicted': _svd(params[layer_name]), 'post-processed': _svd(pparams[layer_name])}
    if layer_name in iparams:
        hist['default init'] = _matrix(iparams[layer_name]).ravel()
        spec_sv['default init'] = _svd(iparams[layer_name])
    c1, c2 = st.columns(2)
    c1.plotly_chart(charts.histogram_figure(hist, title=f'Values of {layer_name}'), key='params_hist')
    c2.plotly_chart(
        charts.spectrum_figure(spec_sv, title=f'Singular values of {layer_name}'), key='params_spectrum'
    )

    which = st.selectbox('Per-layer statistic', list(PER_LAYER), key='params_per_layer')
    col = PER_LAYER[which]
    mats = stats[stats['ndim'] >= 2]
    series = {'predicted': mats[col].tolist(), 'post-processed': post['stats'][col].tolist()}
    if f'init_{col}' in mats:
        series['default init'] = mats[f'init_{col}'].tolist()
    st.plotly_chart(
        charts.per_layer_figure(list(mats['name']), series, which, title=f'{which.capitalize()} per layer'),
        key='params_per_layer_chart',
    )
    with st.expander('What post-processing did to each layer'):
        st.dataframe(records, hide_index=True, key='params_records')

    fname = spec.name.replace(':', '_').replace('/', '_')
    downloads = (
        ('predicted', model, 'ghn', 'params_dl_pred'),
        ('post-processed', pmodel, 'ghn-post', 'params_dl_post'),
    )
    for col, (what, net, suffix, key) in zip(st.columns(2), downloads):
        col.download_button(
            f'Download {what} weights (.safetensors)',
            lambda net=net: _state_dict_bytes(net),
            f'{fname}.{suffix}.safetensors',
            mime='application/octet-stream',
            key=key,
            on_click='ignore',
        )


def main() -> None:
    st.title('Parameters')
    spec = state.current_model()
    ghn, err = loaders.current_ghn()
    if ghn is None:
        show_error('No GHN is loaded', err, 'Choose a GHN checkpoint on the Home page.')
        st.stop()
    st.caption(f'Model: **{spec.label}** (change it on the Architecture page)')
    complete = st.toggle(
        'Fill what the GHN cannot predict',
        key='params_complete',
        help=(
            'Tensors without a graph node (layer scales, position embeddings, class tokens, ...) get a value '
            'by a labelled rule of ghnviz.hyper.extras, e.g. the layer-scale constant 1e-6. Off: exactly the '
            'tensors the published GHN code predicts; the rest keep their default init.'
        ),
    )
    key = (spec.key, state.ghn_source(), state.ghn_device(), complete)
    if st.button('Predict parameters', key='params_predict', type='primary'):
        with (
            st.spinner('Predicting…'),
            guard('Prediction failed', 'Choose another model, or check the GHN on the Home page.'),
        ):
            _predict(ghn, spec, key, complete)
    result = st.session_state.get('params_result')
    if result is None or result.get('key') != key:
        st.info('Press **Predict parameters** to let the GHN predict every parameter of this model.')
        st.stop()
    try:
        _results(result, spec, loaders.num_classes_for(ghn))
    except Exception as exc:  # noqa: BLE001
        show_error('Could not show the parameters', exc, 'Try other post-processing settings or models.')


page.run('Parameters', main)
