"""Drawing layout of computation graphs: layers, ordering, edge routing, folding, PNG rendering."""

from __future__ import annotations

import io

import numpy as np
import pytest

import ghnviz
from ghnviz.graph.layout import (
    BLOCK_OP,
    edge_segments,
    fold_graph,
    graph_layout,
    layered_layout,
    line_segments,
    max_module_depth,
    module_paths,
    render_png,
)

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def resnet18_graph():
    return ghnviz.build_graph(ghnviz.create_model('resnet18', num_classes=10))


def _positions_unique(layout) -> bool:
    """No two nodes or routing points share a slot (row, x)."""
    slots = {(int(d), float(x)) for d, x in zip(layout.depth, layout.x)}
    if len(slots) != len(layout.x):
        return False
    for pts in layout.edge_points:
        for x, y in pts[1:-1]:  # routing points only
            slot = (int(round(-y)), float(x))
            if slot in slots:
                return False
            slots.add(slot)
    return True


def test_rows_are_longest_paths_and_centred():
    # 0 -> 1 -> 2 -> 3 and a skip 0 -> 3: node 3 is on row 3, the skip is routed through rows 1 and 2
    edges = np.array([[0, 1], [1, 2], [2, 3], [0, 3], [0, 4]])
    lay = layered_layout(5, edges)
    assert lay.depth.tolist() == [0, 1, 2, 3, 1]
    assert lay.y.tolist() == [0.0, -1.0, -2.0, -3.0, -1.0]
    for r in range(lay.n_rows):  # every row (nodes and routing points) is centred on 0
        xs = [x for x, d in zip(lay.x, lay.depth) if d == r]
        xs += [p[0] for pts in lay.edge_points for p in pts[1:-1] if round(-p[1]) == r]
        assert abs(sum(xs)) < 1e-9
    skip = lay.edge_points[3]
    assert skip.shape == (4, 2)  # source, two routing points, target
    assert skip[1:3, 0].tolist() != [lay.x[1], lay.x[2]]  # beside the chain, not through it
    assert _positions_unique(lay)
    assert lay.width == 3  # row 1 holds node 1, node 4 and a routing point


def test_long_edges_become_arcs_beyond_the_routing_limits():
    chain = np.array([[i, i + 1] for i in range(20)])
    edges = np.concatenate([chain, [[0, 20]]])
    lay = layered_layout(21, edges, max_span=5)
    arc = lay.edge_points[-1]
    assert arc.shape == (3, 2)
    assert arc[1, 0] > max(lay.x[0], lay.x[20])  # bulges to the right
    assert arc[1, 1] == pytest.approx(-10.0)
    lay = layered_layout(21, edges, max_span=50, max_dummies=3)  # budget too small for 19 points
    assert lay.edge_points[-1].shape == (3, 2)


def test_cycles_share_a_row():
    edges = np.array([[0, 1], [1, 2], [2, 1], [2, 3]])  # 1 <-> 2 is a cycle
    lay = layered_layout(4, edges)
    assert lay.depth[1] == lay.depth[2]
    assert lay.depth[0] < lay.depth[1] < lay.depth[3]


def test_barycentre_ordering_removes_crossings():
    # two parallel chains whose second row is listed crosswise: 0->3, 1->2
    edges = np.array([[0, 3], [1, 2]])
    lay = layered_layout(4, edges)
    assert (lay.x[0] < lay.x[1]) == (lay.x[3] < lay.x[2])


def test_resnet18_layout(resnet18_graph):
    g = resnet18_graph
    lay, folded = graph_layout(g)
    assert len(folded) == len(g) and folded.depth == 0
    direct = g.direct_edges
    assert (lay.depth[direct[:, 1]] > lay.depth[direct[:, 0]]).all()  # every edge points down
    assert len(lay.edge_points) == len(direct)
    assert _positions_unique(lay)
    assert lay.n_rows == g.summary()['depth'] + 1
    # residual skips run beside the block: some routed edge leaves x = 0
    routed = [p for p in lay.edge_points if len(p) > 2]
    assert len(routed) == 8 and all(np.abs(p[1:-1, 0]).max() > 0 for p in routed)
    assert graph_layout(g) is graph_layout(g)  # cached by signature


def test_edge_segments_have_one_separator_per_edge(resnet18_graph):
    lay, _ = graph_layout(resnet18_graph)
    xs, ys = edge_segments(lay)
    assert xs.count(None) == ys.count(None) == len(lay.edge_points)
    assert len(xs) == sum(len(p) + 1 for p in lay.edge_points)
    vx, vy = line_segments(lay.x, lay.y, np.array([[0, 1], [1, 2]]))
    assert vx == [lay.x[0], lay.x[1], None, lay.x[1], lay.x[2], None]


def test_module_paths_fold_sums_into_their_block(resnet18_graph):
    g = resnet18_graph
    paths = module_paths(g)
    assert paths[0] is None  # the input
    sums = [i for i, n in enumerate(g.nodes) if n.op == 'sum']
    assert paths[sums[0]].startswith('layer1.0')
    assert max_module_depth(g) == 4  # layer2.0.downsample.0


def test_folding_collapses_blocks(resnet18_graph):
    g = resnet18_graph
    folded = fold_graph(g, 2)
    assert 'layer1.0' in folded.labels and 'layer4.1' in folded.labels
    block = folded.labels.index('layer2.0')
    assert folded.ops[block] == BLOCK_OP
    ops = {g.nodes[i].op for i in folded.members[block]}
    assert {'conv', 'bn', 'sum'} <= ops
    assert sorted(i for m in folded.members for i in m) == list(range(len(g)))
    assert (folded.node_group[folded.members[block]] == block).all()
    assert (folded.edges[:, 0] != folded.edges[:, 1]).all()
    lay, f2 = graph_layout(g, 2)
    assert len(lay.x) == len(f2) == len(folded) < len(g)
    assert len(fold_graph(g, 1)) < len(folded)


def test_render_png(resnet18_graph):
    from PIL import Image

    png = render_png(resnet18_graph, title='resnet18', max_side=1500)
    assert png[:8] == b'\x89PNG\r\n\x1a\n'
    img = Image.open(io.BytesIO(png))
    assert max(img.size) <= 1500 + 400
    colours = {c for _, c in img.convert('RGB').getcolors(1 << 20)}
    assert (244, 165, 130) in colours  # conv fill colour
    folded = Image.open(io.BytesIO(render_png(resnet18_graph, fold_depth=2, virtual=True)))
    assert folded.size[1] < img.size[1]
