"""Gated graph network of GHN-1/GHN-2: one forward and one backward sweep of GRU updates over the graph.

In the forward sweep nodes are updated in increasing index order; node ``v`` receives

    m_v = sum_{u -> v, 1 hop} mlp(h_u) + sum_{u -> v, any hop d} mlp_ve(h_u) / d

computed from the *current* states (already updated in this sweep for nodes before ``v``), then
``h_v = GRU(m_v, h_v)``. The backward sweep does the same in decreasing order over successors.
A batch of graphs is a disjoint union; node ``i`` of every graph is updated at the same time.

Implementation: the sequential order only matters along dependencies, so nodes are grouped into
steps (a node's step is one more than the latest step of the earlier-indexed nodes it reads from);
every step is one batched GRU update. Messages are a small matrix product of precomputed edge
coefficients with a buffer holding ``mlp(h)`` and ``mlp_ve(h)`` of every node, refreshed for the
nodes each step updates. Graphs whose node order is not topological fall back to one node per step,
which reproduces the reads of stale states exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ghnviz.hyper.layers import MLP


@dataclass
class SweepStep:
    """One batched GRU update: which nodes, who sends them messages, with which coefficients."""

    nodes: torch.Tensor | slice  # (k,) global node indices, or a slice when they are consecutive
    senders: torch.Tensor | slice  # (m,) global sender indices, or a slice of consecutive ones
    coef: torch.Tensor  # (k, m * n_msg); column j * n_msg + r weighs message r of sender j


@dataclass
class SweepPlan:
    """Precomputed steps of both sweeps for one batch of graphs."""

    forward: list[SweepStep]
    backward: list[SweepStep]
    n_nodes: int

    def to(self, device: torch.device) -> SweepPlan:
        def move(steps):
            return [
                SweepStep(
                    s.nodes if isinstance(s.nodes, slice) else s.nodes.to(device),
                    s.senders if isinstance(s.senders, slice) else s.senders.to(device),
                    s.coef.to(device),
                )
                for s in steps
            ]

        return SweepPlan(move(self.forward), move(self.backward), self.n_nodes)


def _levels(rows: list[np.ndarray], order: np.ndarray, topo: bool) -> np.ndarray:
    """Step of each node in ``order``: one more than the latest step of the neighbours visited before it."""
    level = np.full(len(rows), -1, dtype=np.int64)
    for t, v in enumerate(order):
        if not topo:
            level[v] = t
            continue
        nb = rows[v]
        seen = level[nb]
        level[v] = int(seen.max()) + 1 if len(nb) and seen.max() >= 0 else 0
    return level


def _as_index(idx: np.ndarray) -> torch.Tensor | slice:
    if len(idx) > 0 and idx[-1] - idx[0] == len(idx) - 1 and np.all(np.diff(idx) == 1):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return torch.from_numpy(idx.astype(np.int64))


def build_sweep_plan(adjs: Sequence[np.ndarray], ve: bool) -> SweepPlan:
    """Precompute the sweep steps for a batch of graphs.

    Args:
        adjs: per graph, the ``(n, n)`` edge matrix (1 = edge, d > 1 = virtual edge of length d).
        ve: also send the virtual-edge messages (``mlp_ve(h_u) / d`` over all hops).

    Returns:
        The plan; nodes are numbered graph after graph.
    """
    n_msg = 2 if ve else 1
    offsets = np.cumsum([0] + [a.shape[0] for a in adjs])
    # Nodes beyond the largest edge target of the batch are never updated (as in the original sweep).
    n_sweep = max((int(np.nonzero(a)[1].max()) + 1 if np.any(a) else 0) for a in adjs) if adjs else 0

    plans = {True: {}, False: {}}  # direction -> level -> list of (global node, [(sender, d)])
    for g, a in enumerate(adjs):
        a = np.asarray(a)
        n = a.shape[0]
        topo = not np.any(np.tril(a) > 0)
        inc = [np.nonzero(a[:, v])[0] for v in range(n)]  # senders in the forward sweep
        out = [np.nonzero(a[v])[0] for v in range(n)]  # senders in the backward sweep
        m = min(n, n_sweep)
        for fwd, nbrs, order in ((True, inc, np.arange(m)), (False, out, np.arange(m)[::-1])):
            lv = _levels(nbrs, order, topo)
            for v in order:
                d = a[nbrs[v], v] if fwd else a[v, nbrs[v]]
                plans[fwd].setdefault(int(lv[v]), []).append((offsets[g] + v, offsets[g] + nbrs[v], d))

    def steps(fwd: bool) -> list[SweepStep]:
        result = []
        for level in sorted(plans[fwd]):
            entries = sorted(plans[fwd][level], key=lambda e: e[0])
            nodes = np.array([e[0] for e in entries], dtype=np.int64)
            all_senders = np.concatenate([e[1] for e in entries]) if entries else np.zeros(0, np.int64)
            uniq = np.unique(all_senders)
            if len(uniq) and uniq[-1] - uniq[0] + 1 <= 2 * len(uniq) + 16:
                senders = np.arange(uniq[0], uniq[-1] + 1)  # dense span: cheaper to slice than to gather
            else:
                senders = uniq
            coef = np.zeros((len(nodes), len(senders) * n_msg), dtype=np.float32)
            for r, (_, src, dist) in enumerate(entries):
                cols = np.searchsorted(senders, src) * n_msg
                coef[r, cols] = dist == 1
                if ve:
                    coef[r, cols + 1] = 1.0 / dist
            result.append(SweepStep(_as_index(nodes), _as_index(senders), torch.from_numpy(coef)))
        return result

    return SweepPlan(steps(True), steps(False), int(offsets[-1]))


class GatedGNN(nn.Module):
    """Message MLPs and a shared GRU cell (keys ``mlp.fc.*``, ``mlp_ve.fc.*``, ``gru.*``).

    Args:
        hid: node embedding width.
        ve: use virtual edges (adds ``mlp_ve`` and halves the message MLPs' hidden width).
    """

    def __init__(self, hid: int, ve: bool = True):
        super().__init__()
        self.hid, self.ve = hid, ve
        self.mlp = MLP(hid, (hid // 2 if ve else hid, hid))
        if ve:
            self.mlp_ve = MLP(hid, (hid // 2, hid))
        self.gru = nn.GRUCell(hid, hid)

    def _message_mlps(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The message MLPs fused into one two-layer MLP with outputs ``[mlp(h), mlp_ve(h)]``."""
        mlps = [self.mlp] + ([self.mlp_ve] if self.ve else [])
        w1 = torch.cat([m.fc[0].weight for m in mlps])  # (sum of hidden, hid)
        b1 = torch.cat([m.fc[0].bias for m in mlps])
        w2 = torch.block_diag(*[m.fc[2].weight for m in mlps])  # (n_msg * hid, sum of hidden)
        b2 = torch.cat([m.fc[2].bias for m in mlps])
        return w1, b1, w2, b2

    def forward(self, x: torch.Tensor, plan: SweepPlan) -> torch.Tensor:
        """``(N, hid)`` initial node embeddings -> updated embeddings after both sweeps."""
        n, c = x.shape
        n_msg = 2 if self.ve else 1
        w1, b1, w2, b2 = self._message_mlps()
        gru = self.gru
        # with autograd on, clone the slices autograd saves, since the buffers are updated in place
        keep = torch.is_grad_enabled()

        def messages(h: torch.Tensor) -> torch.Tensor:
            return F.relu(F.linear(F.relu(F.linear(h, w1, b1)), w2, b2)).view(-1, n_msg, c)  # (k, n_msg, hid)

        hx = x.clone()  # (N, hid)
        buf = messages(x).clone()  # (N, n_msg, hid), updated in place below
        for steps in (plan.forward, plan.backward):
            for step in steps:
                src = buf[step.senders]
                if keep:
                    src = src.clone()
                msg = step.coef @ src.reshape(-1, c)  # (k, hid)
                h = hx[step.nodes]
                if keep:
                    h = h.clone()
                h = torch.gru_cell(msg, h, gru.weight_ih, gru.weight_hh, gru.bias_ih, gru.bias_hh)  # (k, hid)
                hx[step.nodes] = h
                buf[step.nodes] = messages(h)
        return hx
