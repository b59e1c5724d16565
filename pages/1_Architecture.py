"""Architecture page: choose a model (torchvision, DeepNets-1M, pasted code) and explore its graph."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from ghnviz.graph.layout import graph_layout, max_module_depth, render_png
from ghnviz.ui import charts, loaders, page, state
from ghnviz.ui.errors import guard, show_error
from ghnviz.zoo.deepnets1m.space import SPLIT_NAMES

EXAMPLE_CODE = """import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(x.mean((2, 3)))
"""
SOURCES = ['torchvision', 'DeepNets-1M', 'Paste code']
SIZES = [32, 224]
NAMED = 'named genotype'
SPLIT_OPTIONS = [*SPLIT_NAMES, NAMED]
# colour option -> weight-statistic column (None: op type / parameter count)
COLOR_BY = {
    'op type': None,
    'parameter count': 'numel',
    'weight std': 'std',
    'weight norm': 'norm',
    'filter diversity': 'diversity',
    'effective rank': 'eff_rank',
    'condition number (log10)': 'cond',
}


@st.cache_data(show_spinner=False)
def _tv_names() -> list[str]:
    import ghnviz

    return ghnviz.list_models('torchvision')


def _pick_torchvision(image_size: int) -> state.ModelSpec:
    name = st.selectbox(
        'torchvision model',
        _tv_names(),
        key='arch_tv',
        help='Type to search. Built with random weights (nothing is downloaded).',
    )
    return state.ModelSpec(state.ZOO, name, image_size)


def _pick_deepnets(image_size: int) -> state.ModelSpec:
    from ghnviz.zoo.deepnets1m.genotypes import GENOTYPES
    from ghnviz.zoo.deepnets1m.space import PREDEFINED_SIZE, SPLITS

    c1, c2, c3 = st.columns([2, 2, 1])
    split = c1.selectbox(
        'Split', SPLIT_OPTIONS, key='arch_split', help='DeepNets-1M splits; train has 1M nets.'
    )
    if split == NAMED:
        geno = c2.selectbox('Genotype', sorted(GENOTYPES), key='arch_genotype')
        return state.ModelSpec(state.ZOO, f'deepnets1m:{geno}', image_size)
    size = PREDEFINED_SIZE if split == 'predefined' else SPLITS[split].size
    if c3.button('Sample one', icon=':material/casino:', key='arch_sample', help='A random architecture'):
        st.session_state['arch_index'] = int(np.random.default_rng().integers(size))
    c3.caption(f'{size:,} architectures')
    st.session_state['arch_index'] = min(int(st.session_state.get('arch_index', 0)), size - 1)
    index = c2.number_input('Index', min_value=0, max_value=size - 1, step=1, key='arch_index')
    return state.ModelSpec(state.ZOO, f'deepnets1m:{split}/{int(index)}', image_size)


def _pick_pasted(image_size: int, num_classes: int) -> state.ModelSpec | None:
    from ghnviz.zoo.pasted import HINTS, PastedCodeError, check_pasted, code_allowed

    if not code_allowed():
        st.info('Pasting code is switched off on this server (`GHNVIZ_ALLOW_CODE=0`).')
        return None
    st.caption(
        'The code is checked in a separate process with time and memory limits; a checked model is '
        'then built in the app itself to predict its parameters. Paste only code you would run yourself.'
    )
    code = st.text_area('Code defining an nn.Module', height=300, key='arch_code')
    c1, c2 = st.columns([3, 1])
    cls = c1.text_input('Class (empty: the last nn.Module subclass defined)', key='arch_class').strip()
    if c2.button('Check and use', key='arch_check', type='primary'):
        with st.spinner('Checking the code in a separate process…'):
            try:
                pasted = check_pasted(code, num_classes, (3, image_size, image_size), cls or None)
            except PastedCodeError as exc:
                show_error(
                    f'The code cannot be used ({exc.kind})', exc.message, HINTS.get(exc.kind, '').capitalize()
                )
                return None
        for w in pasted.warnings:
            st.warning(w)
        st.success(f'{pasted.class_name}: {pasted.n_params:,} parameters, checked in {pasted.seconds:.1f} s')
        return state.ModelSpec(state.PASTED, pasted.class_name, image_size, pasted.to_json())
    return None


def _widget_values(spec: state.ModelSpec) -> dict:
    """The model-choice widget values that show ``spec``."""
    from ghnviz.zoo.deepnets1m.genotypes import GENOTYPES

    values: dict = {'arch_image_size': spec.image_size if spec.image_size in SIZES else 32}
    if spec.source == state.PASTED:
        values.update(arch_source='Paste code', arch_code=loaders.pasted_of(spec).source)
    elif spec.name.startswith('deepnets1m:'):
        rest = spec.name.split(':', 1)[1]
        values['arch_source'] = 'DeepNets-1M'
        if rest in GENOTYPES:
            values.update(arch_split=NAMED, arch_genotype=rest)
        elif '/' in rest:
            split, index = rest.split('/', 1)
            values.update(arch_split=split, arch_index=int(index))
    else:
        values.update(arch_source='torchvision', arch_tv=spec.name)
    return values


def _seed_widgets(current: state.ModelSpec) -> None:
    """Make the widgets show the session's model: all of them when it was chosen elsewhere (another
    page), otherwise only those without a value yet (first visit, or cleared after a page switch)."""
    chosen_elsewhere = st.session_state.get('arch_synced') != current.key
    defaults = {
        'arch_source': 'torchvision',
        'arch_tv': state.DEFAULT_MODEL,
        'arch_split': 'test',
        'arch_index': 0,
        'arch_code': EXAMPLE_CODE,
        'arch_image_size': 32,
    }
    wanted = {**defaults, **_widget_values(current)}
    for key, value in wanted.items():
        if key not in st.session_state or (chosen_elsewhere and key in _widget_values(current)):
            st.session_state[key] = value


def _choose_model(num_classes: int) -> None:
    current = state.current_model()
    _seed_widgets(current)
    c1, c2 = st.columns([3, 2])
    source = c1.segmented_control('Source', SOURCES, key='arch_source') or 'torchvision'
    image_size = (
        c2.segmented_control(
            'Input size',
            SIZES,
            key='arch_image_size',
            format_func=lambda s: f'{s}×{s}' + (' (CIFAR)' if s == 32 else ' (ImageNet)'),
            help='32: torchvision stems are adapted to small images, as for CIFAR-10 GHNs.',
        )
        or 32
    )
    if source == 'torchvision':
        spec = _pick_torchvision(image_size)
    elif source == 'DeepNets-1M':
        spec = _pick_deepnets(image_size)
    else:
        spec = _pick_pasted(image_size, num_classes)
    if spec is not None and spec != current:
        state.set_model(spec)
    st.session_state['arch_synced'] = state.current_model().key


def _node_values(graph, spec: state.ModelSpec, num_classes: int, column: str) -> tuple[np.ndarray, str]:
    """Per-node value of a statistic of the current weights (the predicted ones if they were
    predicted on the Parameters page, else the default initialisation), and which weights those are."""
    counts = charts.node_param_counts(graph).astype(float)
    if column == 'numel':
        return np.where(counts > 0, counts, np.nan), ''
    pred = st.session_state.get('params_result')
    if pred is not None and pred['key'][0] == spec.key and pred.get('stats') is not None:
        df, source = pred['stats'], 'predicted weights'
    else:
        df, source = loaders.init_stats(spec.key, num_classes, spec), 'default initialisation'

    by_name = dict(zip(df['name'], df[column]))
    vals = np.array([float(by_name.get(n.param, np.nan)) if n.param else np.nan for n in graph.nodes])
    if column == 'cond':
        vals = np.log10(np.where(vals > 0, vals, np.nan))
    return vals, source


def _fmt(v) -> str:
    if isinstance(v, float):
        return f'{v:.3g}'
    if isinstance(v, int):
        return f'{v:,}'
    if isinstance(v, (tuple, list)):
        return '×'.join(map(str, v))
    return str(v)


def _compact(n: int) -> str:
    for div, unit in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if n >= div:
            return f'{n / div:.1f}{unit}'
    return str(n)


def _missing_params(graph) -> list[str]:
    """Parameter tensors that no node stands for and that are not predicted with another node."""
    norm_biases = set(graph.meta.get('norm_biases') or [])
    return [p for p in graph.meta.get('params_without_node') or [] if p not in norm_biases]


def _without_node(graph, summary: dict) -> int:
    return int(summary.get('n_tensors_without_node', len(_missing_params(graph))))


def _graph_section(spec: state.ModelSpec, num_classes: int) -> None:
    with guard(
        f'Could not trace the computation graph of {spec.name}', 'Choose another model or input size.'
    ):
        graph = loaders.graph_for(spec.key, num_classes, spec)
    summary = graph.summary()
    m = st.columns(6)
    m[0].metric('Nodes', summary['n_nodes'])
    m[1].metric('Edges', summary['n_edges'])
    m[2].metric('Virtual edges', f'{summary["n_virtual_edges"]:,}')
    m[3].metric('Depth', summary['depth'])
    m[4].metric('Parameters', _compact(summary['n_params_covered']), help=f'{summary["n_params_covered"]:,}')
    m[5].metric(
        'Without node', _without_node(graph, summary), help='Parameter tensors no graph node stands for'
    )

    max_depth = max_module_depth(graph)
    c1, c2, c3, c4 = st.columns([2, 2, 2, 1.2])
    color_by = c1.selectbox('Colour nodes by', list(COLOR_BY), key='arch_color')
    query = c2.text_input('Search nodes', key='arch_search', placeholder='e.g. layer3 or conv')
    fold = c3.slider(
        'Fold blocks at module depth',
        0,
        max(max_depth, 1),
        0,
        key='arch_fold',
        help='Collapse nodes that share the first N parts of their module path (0: no folding).',
        disabled=max_depth == 0,
    )
    virtual = c4.toggle(
        'Virtual edges', key='arch_virtual', disabled=fold > 0, help='Shortest-path edges the GHN also uses'
    )

    layout, folded = graph_layout(graph, fold)
    values = None
    column = COLOR_BY[color_by]
    if column is not None:
        try:
            node_vals, source = _node_values(graph, spec, num_classes, column)
        except Exception as exc:  # noqa: BLE001
            show_error('Could not compute the weight statistics', exc, 'Colour by op type instead.')
        else:
            values = charts.folded_values(folded, node_vals, 'sum' if column == 'numel' else 'mean')
            if source:
                st.caption(f'{color_by.capitalize()} of the {source}; grey: no parameter or no value.')
    fig = charts.graph_figure(graph, layout, folded, values, color_by, query, virtual)
    if query.strip():
        st.caption(
            f'{len(charts.match_nodes(graph, folded, query))} nodes match “{query.strip()}” (red rings)'
        )
    left, right = st.columns([3, 2], gap='large')
    left.plotly_chart(
        fig,
        key='arch_graph',
        width='stretch',
        config={
            'scrollZoom': True,
            'displaylogo': False,
            'toImageButtonOptions': {'format': 'png', 'filename': spec.name.replace(':', '_'), 'scale': 2},
        },
    )
    with right:
        _side_tabs(graph, summary, spec, fold, virtual)


def _side_tabs(graph, summary: dict, spec: state.ModelSpec, fold: int, virtual: bool) -> None:
    t1, t2, t3 = st.tabs(['Summary', 'Nodes', 'Export'])
    with t1:
        ops = pd.DataFrame(sorted(summary['ops'].items(), key=lambda kv: -kv[1]), columns=['op', 'nodes'])
        st.dataframe(ops, hide_index=True, key='arch_ops')
        facts = {k: v for k, v in summary.items() if k != 'ops'}
        facts.update({k: graph.meta[k] for k in ('model', 'input_size', 'time_build_s') if k in graph.meta})
        rows = [(k.replace('_', ' '), _fmt(v)) for k, v in facts.items()]
        st.dataframe(pd.DataFrame(rows, columns=['', 'value']), hide_index=True, key='arch_facts')
        missing = _missing_params(graph)
        if missing:
            st.caption('Parameters without a node (not predicted by a GHN): ' + ', '.join(missing[:20]))
    with t2:
        st.dataframe(graph.to_frame(), key='arch_nodes', height=600)
    with t3:
        fname = spec.name.replace(':', '_').replace('/', '_')
        with_virtual = st.checkbox('Include virtual edges in the JSON', key='arch_json_virtual')
        st.download_button(
            'Graph as JSON',
            lambda: graph.to_json(virtual=with_virtual, indent=1),
            f'{fname}.graph.json',
            mime='application/json',
            key='arch_dl_json',
            on_click='ignore',
            icon=':material/download:',
        )
        st.download_button(
            'Graph as PNG',
            lambda: render_png(graph, fold, virtual, title=spec.label),
            f'{fname}.graph.png',
            mime='image/png',
            key='arch_dl_png',
            on_click='ignore',
            icon=':material/download:',
        )
        st.download_button(
            'Graphviz DOT',
            lambda: graph.to_dot(),
            f'{fname}.dot',
            mime='text/vnd.graphviz',
            key='arch_dl_dot',
            on_click='ignore',
            icon=':material/download:',
        )
        st.caption('The chart’s camera button saves the current view as PNG.')


def main() -> None:
    st.title('Architecture')
    ghn, _ = loaders.current_ghn()
    num_classes = loaders.num_classes_for(ghn)
    _choose_model(num_classes)
    spec = state.current_model()
    st.caption(f'Model: **{spec.label}** · classifier for {num_classes} classes (the GHN’s)')
    _graph_section(spec, num_classes)


page.run('Architecture', main)
