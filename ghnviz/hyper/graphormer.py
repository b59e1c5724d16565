"""The Graphormer stack that propagates node embeddings in GHN-3.

A stack of pre-LayerNorm transformer blocks over the dense node matrix of a batch of graphs.
The first block also injects the graph structure:

* node features get learned embeddings of the in-degree and out-degree over real edges (clipped at
  100) and of the distance from the input node (row 0 of the edge matrix, clipped at 1000);
* every node pair ``(u, v)`` gets a per-head attention bias computed from the forward and backward
  edge values: rows ``adj[u, v] + 2`` and ``adj[v, u] + 2`` of a 257-row table, concatenated, then
  Linear(2h, h), ReLU, Linear(h, heads). Later blocks reuse that bias.

Module and parameter names follow the published GHN-3 state dicts (``gnn.<i>.ln1``,
``gnn.<i>.attn.to_qkv``, ``gnn.0.centrality_embed_in``, ...), so those files load as they are.
The arithmetic follows the same order as the published implementation (logits scaled after
``q @ k^T``, bias added, padding filled with ``-2**15``, softmax in the input dtype), which keeps
predictions equal to within float32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

MAX_DEGREE = 100  # degrees above this share the last embedding row
MAX_INPUT_DIST = 1000  # distances from the input node above this share the last row
N_EDGE_VALUES = 257  # edge value table rows: row 2 = no edge, row d + 2 = edge value d <= 255 (0, 1 unused)
EDGE_OFFSET = 2  # edge value d is looked up at row d + 2 (so a missing edge reads row 2)
PAD_LOGIT = -(2.0**15)  # attention logit of padded pairs; representable in float16 (autocast)


def sinusoid_table(n: int, dim: int) -> torch.Tensor:
    """Transformer position table ``(n, dim)``: sin on even, cos on odd columns; row 0 is zero."""
    pos = torch.arange(n).unsqueeze(1)  # (n, 1)
    freq = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))  # (dim/2,)
    table = torch.zeros(n, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    table[0] = 0
    return table


class EdgeEmbedding(nn.Module):
    """A learned vector per edge value, initialised with a sinusoid table."""

    def __init__(self, dim: int, n_values: int = N_EDGE_VALUES):
        super().__init__()
        self.embed = nn.Embedding(n_values, dim)
        with torch.no_grad():
            self.embed.weight.copy_(sinusoid_table(n_values, dim))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.embed(values)


class FeedForward(nn.Module):
    """hid -> ratio*hid -> hid with GELU (``net.0`` and ``net.3`` hold the weights)."""

    def __init__(self, dim: int, ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim * ratio), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * ratio, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class DenseGraphs:
    """Structure of a batch of graphs as the Graphormer reads it (depends on the graphs only, so cacheable).

    Graphs are padded to the largest one (``N`` nodes). Edge values are described through the distinct
    (forward, backward) value pairs: a DAG never has both directions of an edge, so a graph has at most
    about ``2 * ve_cutoff + 1`` of them, and the attention bias is computed once per distinct pair.
    """

    in_degree: torch.Tensor  # (B, N) real in-edges per node, clipped at MAX_DEGREE
    out_degree: torch.Tensor  # (B, N) real out-edges, clipped
    input_dist: torch.Tensor  # (B, N) edge value from node 0, clipped at MAX_INPUT_DIST
    pair_values: torch.Tensor  # (U, 2) distinct (adj[u, v] + 2, adj[v, u] + 2) rows
    pair_index: torch.Tensor  # (B, N, N) row of pair_values for each node pair
    node_mask: torch.Tensor | None  # (B, N) True for real nodes; None when nothing is padded
    n_nodes: list[int]  # nodes of each graph

    @classmethod
    def from_adjacency(cls, adjs: Sequence[np.ndarray | torch.Tensor], device: torch.device | str = 'cpu'):
        """Build from one ``(n_i, n_i)`` integer edge matrix per graph (0 none, 1 real, d > 1 virtual)."""
        sizes = [int(a.shape[0]) for a in adjs]
        n = max(sizes)
        adj = torch.zeros(len(adjs), n, n, dtype=torch.long)
        for b, a in enumerate(adjs):
            adj[b, : sizes[b], : sizes[b]] = torch.as_tensor(np.asarray(a), dtype=torch.long)
        real = (adj == 1).long()  # (B, N, N)
        fw = adj + EDGE_OFFSET  # (B, N, N)
        codes = fw * N_EDGE_VALUES + fw.transpose(1, 2)  # one integer per (forward, backward) pair
        uniq, inverse = torch.unique(codes, return_inverse=True)  # (U,), (B, N, N)
        node_mask = None
        if min(sizes) < n:
            node_mask = torch.arange(n).unsqueeze(0) < torch.tensor(sizes).unsqueeze(1)  # (B, N)
            node_mask = node_mask.to(device)
        return cls(
            in_degree=real.sum(1).clip(0, MAX_DEGREE).to(device),
            out_degree=real.sum(2).clip(0, MAX_DEGREE).to(device),
            input_dist=adj[:, 0, :].clip(0, MAX_INPUT_DIST).to(device),
            pair_values=torch.stack((uniq // N_EDGE_VALUES, uniq % N_EDGE_VALUES), dim=-1).to(device),
            pair_index=inverse.to(device),
            node_mask=node_mask,
            n_nodes=sizes,
        )

    def to_dense(self, x: torch.Tensor) -> torch.Tensor:
        """``(sum n_i, C)`` node rows, graph after graph -> ``(B, N, C)`` zero-padded."""
        if self.node_mask is None:
            return x.view(len(self.n_nodes), -1, x.shape[-1])
        out = x.new_zeros(*self.node_mask.shape, x.shape[-1])
        out[self.node_mask] = x
        return out

    def to_flat(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_dense`."""
        return x.reshape(-1, x.shape[-1]) if self.node_mask is None else x[self.node_mask]


class EdgeAttention(nn.Module):
    """Multi-head self-attention with an additive per-head bias on the logits.

    Args:
        dim: node feature size.
        heads: number of heads (``dim`` must be divisible by it).
        edge_bias: build the edge-value embedding and its projection to a per-head bias (first block).
    """

    def __init__(self, dim: int, heads: int = 8, edge_bias: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f'hidden size {dim} is not divisible by {heads} heads')
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))
        if edge_bias:
            self.edge_embed = EdgeEmbedding(dim)
            self.proj_e = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, heads))

    def edge_bias(self, graphs: DenseGraphs) -> torch.Tensor:
        """Per-head attention bias ``(B, heads, N, N)`` of every node pair.

        A pair is described by its (forward, backward) edge values ``(adj[u, v] + 2, adj[v, u] + 2)``; both
        are embedded, concatenated and projected to one value per head. The projection runs once per
        distinct pair and is gathered back, which equals running it on every node pair.
        """
        emb = self.edge_embed(graphs.pair_values).flatten(1)  # (U, 2*dim)
        table = self.proj_e(emb)  # (U, heads)
        return table[graphs.pair_index].permute(0, 3, 1, 2)  # (B, heads, N, N)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, pad: torch.Tensor | None) -> torch.Tensor:
        """Attend.

        Args:
            x: ``(B, N, dim)`` node features.
            bias: ``(B, heads, N, N)`` additive logit bias, or None.
            pad: ``(B, N, N)`` True where a pair involves a padding node, or None when nothing is padded.
        """
        b, n, c = x.shape
        qkv = self.to_qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, dim/heads)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # (B, heads, N, N)
        if bias is not None:
            logits = logits + bias
        if pad is not None:
            logits = logits.masked_fill(pad.unsqueeze(1), PAD_LOGIT)
        attn = logits.softmax(dim=-1)  # (B, heads, N, N)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)  # (B, N, dim)
        return self.to_out(out)


class GraphormerLayer(nn.Module):
    """One pre-LN block: ``x + attn(ln1(x))`` then ``x + ff(ln2(x))``; the first block adds structure.

    Args:
        dim: node feature size.
        heads: attention heads.
        first: this is block 0 (degree / input-distance embeddings, edge-value attention bias).
        ff_ratio: hidden size of the feed-forward part relative to ``dim``.
        eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, heads: int = 8, first: bool = False, ff_ratio: int = 4, eps: float = 1e-5):
        super().__init__()
        self.first = first
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.attn = EdgeAttention(dim, heads, edge_bias=first)
        self.ln2 = nn.LayerNorm(dim, eps=eps)
        self.ff = FeedForward(dim, ff_ratio)
        if first:
            self.centrality_embed_in = nn.Embedding(MAX_DEGREE + 1, dim)
            self.centrality_embed_out = nn.Embedding(MAX_DEGREE + 1, dim)
            self.input_dist_embed = nn.Embedding(MAX_INPUT_DIST + 1, dim)

    def add_structure(self, x: torch.Tensor, graphs: DenseGraphs) -> torch.Tensor:
        """Add degree and input-distance embeddings to ``x`` ``(B, N, dim)`` (block 0 only)."""
        x = x + self.centrality_embed_in(graphs.in_degree)  # (B, N, dim)
        x = x + self.centrality_embed_out(graphs.out_degree)
        x = x + self.input_dist_embed(graphs.input_dist)
        if graphs.node_mask is not None:
            x = x * graphs.node_mask.unsqueeze(-1)  # padding rows to zero
        return x

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, pad: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), bias, pad)
        return x + self.ff(self.ln2(x))


class Graphormer(nn.ModuleList):
    """The GHN-3 node-propagation stack (children named ``0``, ``1``, ... as in the published files).

    Args:
        dim: node feature size.
        heads: attention heads.
        layers: number of blocks.
    """

    def __init__(self, dim: int, heads: int = 8, layers: int = 3):
        super().__init__([GraphormerLayer(dim, heads, first=i == 0) for i in range(layers)])

    def forward(self, x: torch.Tensor, graphs: DenseGraphs) -> torch.Tensor:
        """``(B, N, dim)`` node features (padding rows arbitrary) -> ``(B, N, dim)``."""
        pad = None
        if graphs.node_mask is not None:
            pad = ~(graphs.node_mask.unsqueeze(2) & graphs.node_mask.unsqueeze(1))  # (B, N, N) padded pairs
        first = self[0]
        x = first.add_structure(x, graphs)
        bias = first.attn.edge_bias(graphs)  # (B, heads, N, N), shared by every block
        for layer in self:
            x = layer(x, bias, pad)
        return x
