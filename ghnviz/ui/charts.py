"""Plotly figures of the app (pure functions of data; no streamlit calls)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from ghnviz.graph.core import ComputationGraph
from ghnviz.graph.export import OP_COLORS
from ghnviz.graph.layout import BLOCK_COLOR, BLOCK_OP, FoldedGraph, Layout, edge_segments, line_segments

HIGHLIGHT = '#d62728'
SERIES_COLORS = ('#1f77b4', '#ff7f0e', '#2ca02c', '#9467bd', '#8c564b', '#e377c2', '#17becf', '#7f7f7f')
_FONT = dict(family='sans-serif', size=12)
MAX_LABELS = 80  # folded graphs with at most this many nodes get text labels
X_STRETCH = 2.5  # horizontal spacing of nodes in a row, relative to the spacing of rows


def _line_layout(fig: go.Figure, title: str, height: int, x_title: str, y_title: str, legend_y: float):
    """The layout shared by the histogram, per-layer and curve charts: title, axes, legend below."""
    fig.update_layout(
        title=title,
        height=height,
        margin=dict(l=10, r=10, t=40, b=10),
        font=_FONT,
        xaxis_title=x_title,
        yaxis_title=y_title,
        legend=dict(orientation='h', y=legend_y),
    )


def node_param_counts(graph: ComputationGraph) -> np.ndarray:
    """Elements of the tensor each node stands for (0 for nodes without a parameter), shape ``(n,)``."""
    return np.array(
        [int(math.prod(n.shape)) if n.param is not None and n.shape else 0 for n in graph.nodes],
        dtype=np.int64,
    )


def _fmt_shape(shape) -> str:
    return '×'.join(str(s) for s in shape) if shape else '–'


def hover_texts(
    graph: ComputationGraph, folded: FoldedGraph, values: np.ndarray | None, value_name: str
) -> list:
    """One HTML hover text per (folded) node: name, op, module path, shape, parameter count."""
    counts = node_param_counts(graph)
    texts = []
    for g, members in enumerate(folded.members):
        extra = ''
        if values is not None and np.isfinite(values[g]):
            extra = f'<br>{value_name}: {values[g]:.4g}'
        if len(members) == 1:
            node = graph.nodes[members[0]]
            texts.append(
                f'<b>{node.name}</b><br>op: {node.op}<br>module: {node.module or "–"}'
                f'<br>shape: {_fmt_shape(node.shape)}<br>params: {counts[members[0]]:,}{extra}'
            )
        else:
            ops = Counter(graph.nodes[i].op for i in members)
            ops_text = ', '.join(f'{op}×{k}' for op, k in ops.most_common(6))
            texts.append(
                f'<b>{folded.labels[g]}</b> (folded)<br>{len(members)} nodes: {ops_text}'
                f'<br>params: {int(counts[members].sum()):,}{extra}'
            )
    return texts


def match_nodes(graph: ComputationGraph, folded: FoldedGraph, query: str) -> np.ndarray:
    """Indices of (folded) nodes whose name, module, op or label contains ``query`` (case-insensitive)."""
    q = query.strip().lower()
    if not q:
        return np.zeros(0, dtype=np.int64)
    hits = []
    for g, members in enumerate(folded.members):
        texts = [folded.labels[g]]
        for i in members:
            n = graph.nodes[i]
            texts += [n.name, n.op, n.module or '', n.param or '']
        if any(q in t.lower() for t in texts):
            hits.append(g)
    return np.array(hits, dtype=np.int64)


def graph_figure(
    graph: ComputationGraph,
    layout: Layout,
    folded: FoldedGraph,
    values: np.ndarray | None = None,
    value_name: str = '',
    query: str = '',
    virtual: bool = False,
    height: int | None = None,
) -> go.Figure:
    """The interactive graph: one line trace for edges, one ``scattergl`` trace for all nodes.

    Args:
        graph: the full graph.
        layout: layout of ``folded``.
        folded: the (possibly folded) graph drawn.
        values: per drawn node, a number to colour by (NaN: no value, drawn grey); None colours by op.
        value_name: what ``values`` is, for the colour bar and hover.
        query: highlight nodes matching this text (an extra ring trace).
        virtual: also draw virtual edges (only when nothing is folded).
        height: figure height in pixels; default grows with the number of rows.
    """
    x, y = layout.x, layout.y
    traces: list = []
    if virtual and folded.depth == 0:
        src, dst = np.nonzero(graph.adj > 1)
        vx, vy = line_segments(x, y, np.stack([src, dst], axis=1))
        traces.append(
            go.Scattergl(
                x=vx,
                y=vy,
                mode='lines',
                line=dict(color='rgba(90,110,200,0.12)', width=1),
                hoverinfo='skip',
                name=f'virtual edges ({len(src):,})',
            )
        )
    ex, ey = edge_segments(layout)
    traces.append(
        go.Scattergl(
            x=ex, y=ey, mode='lines', line=dict(color='#8a8f98', width=1), hoverinfo='skip', name='edges'
        )
    )
    texts = hover_texts(graph, folded, values, value_name)
    rows = max(layout.n_rows, 1)
    row_px = float(np.clip(2400 / rows, 8, 22)) if height is None else max(4.0, (height - 80) / rows)
    base = float(np.clip(0.6 * row_px, 5, 12))
    sizes = np.array([base * 1.6 if op == BLOCK_OP else base for op in folded.ops], dtype=float)
    if values is None:
        marker = dict(
            color=[OP_COLORS.get(op, BLOCK_COLOR) for op in folded.ops],
            size=sizes,
            line=dict(color='#333333', width=1),
        )
        for op in dict.fromkeys(folded.ops):  # legend entries (no points)
            traces.append(
                go.Scattergl(
                    x=[None],
                    y=[None],
                    mode='markers',
                    name=op,
                    marker=dict(
                        color=OP_COLORS.get(op, BLOCK_COLOR), size=10, line=dict(color='#333', width=1)
                    ),
                )
            )
    else:
        colors, scale, cmin, cmax = _with_missing(values)
        marker = dict(
            color=colors,
            colorscale=scale,
            cmin=cmin,
            cmax=cmax,
            showscale=True,
            colorbar=dict(title=dict(text=value_name), thickness=12),
            size=sizes,
            line=dict(color='#333333', width=1),
        )
    labelled = folded.depth > 0 and len(folded) <= MAX_LABELS  # name the blocks of a folded graph
    traces.append(
        go.Scattergl(
            x=x,
            y=y,
            mode='markers+text' if labelled else 'markers',
            marker=marker,
            text=folded.labels if labelled else None,
            textposition='middle right',
            textfont=dict(size=11, color='#444444'),
            hovertext=texts,
            customdata=np.arange(len(x)),
            hovertemplate='%{hovertext}<extra></extra>',
            name='nodes',
            showlegend=False,
        )
    )
    hits = match_nodes(graph, folded, query)
    if len(hits):
        traces.append(
            go.Scattergl(
                x=x[hits],
                y=y[hits],
                mode='markers',
                name=f'matches ({len(hits)})',
                marker=dict(symbol='circle-open', size=sizes[hits] + 12, color=HIGHLIGHT, line=dict(width=3)),
                hoverinfo='skip',
            )
        )
    fig = go.Figure(traces)
    fig.update_layout(
        height=height or int(max(420, 80 + row_px * rows)),
        margin=dict(l=10, r=10, t=30, b=10),
        plot_bgcolor='white',
        hovermode='closest',
        dragmode='pan',
        font=_FONT,
        legend=dict(orientation='h', yanchor='bottom', y=1.0, xanchor='left', x=0),
        xaxis=dict(visible=False),
        # one column step is X_STRETCH times as wide as one row step
        yaxis=dict(visible=False, scaleanchor='x', scaleratio=1 / X_STRETCH),
        uirevision=f'{graph.signature()}:{folded.depth}',
    )
    return fig


MISSING_COLOR = '#d0d0d0'
_MISSING_BAND = 0.03  # share of the colour bar that shows "no value"


def _with_missing(values: np.ndarray) -> tuple[np.ndarray, list, float, float]:
    """Colour numbers for one trace where NaN means "no value": NaN maps below the finite range, onto
    a grey band at the bottom of a Viridis colour scale. Returns (colours, colorscale, cmin, cmax)."""
    from plotly.colors import sequential

    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    lo, hi = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    cmin = lo - (hi - lo) * _MISSING_BAND / (1 - _MISSING_BAND)
    stops = sequential.Viridis
    # grey up to half the band, then the first Viridis colour up to the band (where the finite minimum sits)
    scale = [[0.0, MISSING_COLOR], [_MISSING_BAND / 2, MISSING_COLOR], [_MISSING_BAND / 2 + 1e-9, stops[0]]]
    scale += [[_MISSING_BAND + (1 - _MISSING_BAND) * i / (len(stops) - 1), c] for i, c in enumerate(stops)]
    return np.where(finite, values, cmin), scale, cmin, hi


def folded_values(folded: FoldedGraph, node_values: np.ndarray, reduce: str = 'mean') -> np.ndarray:
    """Per-group value from per-node values (NaN ignored; NaN when a group has none)."""
    out = np.full(len(folded), np.nan)
    for g, members in enumerate(folded.members):
        v = node_values[members]
        v = v[np.isfinite(v)]
        if v.size:
            out[g] = v.sum() if reduce == 'sum' else v.mean()
    return out


# ---------------------------------------------------------------------------------- parameters page
def histogram_figure(series: Mapping[str, np.ndarray], bins: int = 80, title: str = '') -> go.Figure:
    """Overlaid histograms (shared bins) of several value arrays, drawn as step lines."""
    finite = [v[np.isfinite(v)] for v in series.values() if v.size]
    lo = min((float(v.min()) for v in finite if v.size), default=-1.0)
    hi = max((float(v.max()) for v in finite if v.size), default=1.0)
    if hi <= lo:
        lo, hi = lo - 1e-3, hi + 1e-3
    edges = np.linspace(lo, hi, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure()
    for (name, values), color in zip(series.items(), SERIES_COLORS):
        counts, _ = np.histogram(values[np.isfinite(values)], bins=edges)
        dens = counts / max(counts.sum(), 1)
        fig.add_trace(
            go.Scatter(
                x=centres,
                y=dens,
                mode='lines',
                line=dict(shape='hvh', color=color, width=2),
                fill='tozeroy',
                opacity=0.5,
                name=f'{name} (n={values.size:,})',
            )
        )
    _line_layout(fig, title, 340, 'value', 'share of values', legend_y=-0.2)
    return fig


def spectrum_figure(series: Mapping[str, np.ndarray], title: str = '') -> go.Figure:
    """Singular values in decreasing order, one line per series (log scale)."""
    fig = go.Figure()
    for (name, sv), color in zip(series.items(), SERIES_COLORS):
        fig.add_trace(go.Scatter(y=sv, mode='lines', name=name, line=dict(color=color, width=2)))
    fig.update_layout(
        title=title,
        height=340,
        margin=dict(l=10, r=10, t=40, b=10),
        font=_FONT,
        xaxis_title='index',
        yaxis_title='singular value',
        yaxis_type='log',
        legend=dict(orientation='h', y=-0.2),
    )
    return fig


def per_layer_figure(
    layers: Sequence[str], series: Mapping[str, Sequence[float]], y_title: str, title: str = ''
) -> go.Figure:
    """One line per series over the layers (in model order)."""
    fig = go.Figure()
    idx = list(range(1, len(layers) + 1))
    for (name, vals), color in zip(series.items(), SERIES_COLORS):
        fig.add_trace(
            go.Scatter(
                x=idx,
                y=list(vals),
                mode='lines+markers',
                name=name,
                text=list(layers),
                hovertemplate='%{text}<br>%{y:.4f}<extra>' + name + '</extra>',
                line=dict(color=color),
            )
        )
    _line_layout(fig, title, 360, 'layer (model order)', y_title, legend_y=-0.25)
    return fig


# ---------------------------------------------------------------------------------- fine-tuning page
def curves_figure(frames: Mapping[str, object], key: str, title: str, y_title: str) -> go.Figure:
    """One line per run of metric ``key`` over steps; ``frames`` maps a run label to a long metrics frame."""
    fig = go.Figure()
    for (label, frame), color in zip(frames.items(), SERIES_COLORS * 4):
        part = frame[frame['key'] == key] if len(frame) else frame
        if len(part) == 0:
            continue
        fig.add_trace(
            go.Scatter(
                x=part['step'],
                y=part['value'],
                mode='lines+markers' if len(part) < 30 else 'lines',
                name=label,
                line=dict(color=color, width=2),
            )
        )
    _line_layout(fig, title, 320, 'step', y_title, legend_y=-0.3)
    return fig


# --------------------------------------------------------------------------------------------- home page
def training_curve_figure(curve: Sequence[Mapping[str, float]], title: str = '') -> go.Figure:
    """A GHN's learning curve (windows of :func:`ghnviz.train.learning_curve`): accuracy and loss."""
    steps = [c['step'] for c in curve]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=steps,
            y=[100 * c['acc'] for c in curve],
            mode='lines',
            name='training-batch accuracy (%)',
            line=dict(color=SERIES_COLORS[0], width=2),
        )
    )
    fig.add_trace(
        go.Scatter(
            x=steps,
            y=[c['loss'] for c in curve],
            mode='lines',
            name='loss',
            yaxis='y2',
            line=dict(color=SERIES_COLORS[1], width=2),
        )
    )
    _line_layout(fig, title, 320, 'training step', 'accuracy (%)', legend_y=-0.3)
    fig.update_layout(yaxis2=dict(title='loss', overlaying='y', side='right', showgrid=False))
    return fig


# ---------------------------------------------------------------------------------- embeddings page
def embedding_figure(
    ref_xy: np.ndarray,
    values: np.ndarray,
    value_name: str,
    hover: Sequence[str],
    model_xy: np.ndarray,
    model_name: str,
    neighbours: Sequence[int] = (),
    title: str = '',
) -> go.Figure:
    """Reference architectures (one ``scattergl`` trace, coloured by a property), the model as a star,
    its nearest neighbours ringed."""
    fig = go.Figure()
    fig.add_trace(
        go.Scattergl(
            x=ref_xy[:, 0],
            y=ref_xy[:, 1],
            mode='markers',
            name='training architectures',
            text=list(hover),
            hovertemplate='%{text}<extra></extra>',
            marker=dict(
                color=values,
                colorscale='Viridis',
                size=6,
                opacity=0.75,
                showscale=True,
                colorbar=dict(title=dict(text=value_name), thickness=12),
            ),
        )
    )
    idx = np.asarray(list(neighbours), dtype=np.int64)
    if idx.size:
        fig.add_trace(
            go.Scattergl(
                x=ref_xy[idx, 0],
                y=ref_xy[idx, 1],
                mode='markers',
                name=f'{idx.size} nearest',
                hoverinfo='skip',
                marker=dict(symbol='circle-open', size=13, color='#ff7f0e', line=dict(width=2)),
            )
        )
    fig.add_trace(
        go.Scatter(
            x=model_xy[:, 0],
            y=model_xy[:, 1],
            mode='markers',
            name=model_name,
            hovertemplate=f'<b>{model_name}</b><extra></extra>',
            marker=dict(symbol='star', size=20, color=HIGHLIGHT, line=dict(color='black', width=1)),
        )
    )
    fig.update_layout(
        title=title,
        height=560,
        margin=dict(l=10, r=10, t=40, b=10),
        font=_FONT,
        plot_bgcolor='white',
        legend=dict(orientation='h', y=-0.08),
        xaxis=dict(showticklabels=False, zeroline=False, showgrid=False),
        yaxis=dict(showticklabels=False, zeroline=False, showgrid=False),
    )
    return fig
