"""ghnviz app: the home page (which GHN is loaded, and choosing another).

Run with ``streamlit run app.py`` (or ``bash run.sh app``). The other pages live in ``pages/``
(Streamlit's auto-discovery; the sidebar links are drawn by :mod:`ghnviz.ui.page`).
"""

from __future__ import annotations

import streamlit as st

from ghnviz.ui import charts, loaders, page, state
from ghnviz.ui.errors import message_of, show_error


def _load_form() -> None:
    """Pick another GHN: the shipped default, a file path, an upload or a published name."""
    from ghnviz.hyper.hub import OFFICIAL

    kinds = ['Shipped default', 'File path', 'Upload', 'Published (hub)']
    kind = st.radio('Source', kinds, horizontal=True, key='home_ghn_kind')
    devices = ['cpu']
    import torch

    if torch.cuda.is_available():
        devices.append('cuda')
    device = st.selectbox(
        'Device',
        devices,
        key='home_device',
        index=devices.index(state.ghn_device()) if state.ghn_device() in devices else 0,
    )
    source = None
    if kind == 'Shipped default':
        source = 'default'
    elif kind == 'File path':
        source = (
            st.text_input(
                'Checkpoint file',
                key='home_path',
                placeholder='/path/to/ghn2_cifar10.pt',
                help='An official GHN-2 .pt file, a GHN-3 file (joblib), or a ghnviz .safetensors file.',
            ).strip()
            or None
        )
    elif kind == 'Upload':
        up = st.file_uploader('Checkpoint file', key='home_upload', type=None)
        if up is not None:
            source = str(loaders.save_upload(up.name, up.getvalue()))
    else:
        source = st.selectbox(
            'Published checkpoint',
            list(OFFICIAL),
            key='home_hub',
            format_func=lambda k: f'{k}: {OFFICIAL[k].description}',
            help='Downloaded from the Hugging Face hub when not cached and the machine is online.',
        )
    if st.button('Load this GHN', key='home_load', type='primary', disabled=not source):
        try:
            loaders.load_ghn_cached(source, device)
        except Exception as exc:  # noqa: BLE001
            show_error(f'Could not load {source}', exc, 'Check the file, or pick another source above.')
        else:
            state.set_ghn(source, device)
            st.rerun()


def _shipped_card(card: dict) -> None:
    """What the shipped GHN was trained on and how well it does: headline numbers, curve, full card."""
    ev = card.get('evaluation') or {}
    base = ev.get('baselines') or {}
    trained = '; '.join(card[k] for k in ('architectures', 'data') if card.get(k))
    if trained:
        st.markdown(f'**How it was trained.** {trained[0].upper()}{trained[1:]}.')
    c1, c2, c3, c4 = st.columns(4)
    if 'mean_top1' in ev:
        c1.metric(
            f'Mean top-1, {ev.get("n", "?")} test archs',
            f'{ev["mean_top1"]:.1f}%',
            help=f'CIFAR-10 test accuracy of predicted parameters, no training. {ev.get("command", "")}',
        )
    for col, name in ((c2, 'resnet18'), (c3, 'resnet50')):
        if base.get(name) is not None:
            col.metric(f'{name} (predicted)', f'{base[name]:.1f}%', help='adapted to 32x32 inputs')
    if card.get('step'):
        hours = card.get('wall_time_s', 0) / 3600
        c4.metric('Training steps', f'{card["step"]:,}', help=f'{hours:.1f} h on {card.get("hardware", "?")}')
    curve_file = card.get('learning_curve', '').split(' ')[0]  # 'docs/x.csv (what it holds)'
    curve = loaders.ghn_training_curve(curve_file) if curve_file else None
    if curve:
        st.plotly_chart(
            charts.training_curve_figure(curve, 'Learning curve (means over 50 steps)'),
            key='home_curve',
            width='stretch',
        )
    if card.get('status'):
        st.caption(card['status'])
    with st.expander('Model card (assets/ghn_default.json)', expanded=False):
        st.json(card)


PAGE_TEXT = (
    'choose a model and see its computation graph',
    'predict, inspect and post-process its parameters',
    'short runs from several inits, live curves',
    'where the model falls in the GHN training distribution',
)


def home() -> None:
    st.title('ghnviz')
    st.markdown(
        'Graph HyperNetworks predict all the parameters of an unseen network from its computation '
        'graph in one forward pass. Pick an architecture, see its graph, predict its parameters, '
        'compare them after post-processing, and fine-tune them in the background.'
    )
    ghn, err = loaders.current_ghn()
    source = state.ghn_source()
    st.subheader('Graph hypernetwork')
    if ghn is None:
        if source == 'default':
            st.warning(
                'The shipped GHN (`assets/ghn_default.safetensors`) is not available in this copy: '
                f'{message_of(err)}\n\nLoad an official GHN-2/GHN-3 checkpoint below (a file path or an '
                'upload), or start the app with `GHNVIZ_GHN=/path/to/checkpoint`.',
                icon=':material/warning:',
            )
        else:
            show_error(f'Could not load the GHN {source}', err, 'Pick another checkpoint below.')
    else:
        facts = loaders.ghn_facts(ghn)
        name = 'the shipped default' if source == 'default' else source.replace('\\', '/').rsplit('/', 1)[-1]
        st.markdown(f'Loaded: **{name}**')
        c1, c2, c3, c4 = st.columns(4)
        c1.metric('Architecture', facts['architecture'])
        c2.metric('Classes', facts.get('num_classes', ghn.num_classes))
        c3.metric('Parameters', f'{facts["parameters"] / 1e6:.2f}M', help=f'{facts["parameters"]:,}')
        c4.metric('Device', facts['device'])
        st.caption(f'Source: `{source}`')
        with st.expander('Configuration', expanded=False):
            st.json({k: v for k, v in facts.items() if k not in ('architecture', 'device')})
        card = loaders.ghn_card() if source == 'default' else None
        if card:
            _shipped_card(card)
    with st.expander('Load another GHN', expanded=ghn is None):
        _load_form()
    st.subheader('Pages')
    for (path, label, icon), what in zip(page.PAGES[1:], PAGE_TEXT):
        st.page_link(path, label=f'{label}: {what}', icon=icon)


page.run('Home', home)
