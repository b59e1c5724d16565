"""How far a model lies from a GHN's training distribution, in the GHN's graph-embedding space.

The space: graph embeddings standardised per dimension with the reference set's mean and standard
deviation (so that no single embedding dimension dominates), compared by Euclidean distance. Every
score below uses this one space.

* ``distance``: mean distance from the model to its ``k`` nearest reference architectures.
* ``percentile``: where ``distance`` falls (0-100, mid-rank) among the reference architectures' own
  leave-one-out ``k``-NN distances. A model drawn from the training distribution gets a percentile
  spread uniformly over 0-100 (median 50); a value near 100 means the model is farther from its
  neighbours than nearly every training architecture is from its own.
* ``mahalanobis``: distance to the reference mean under a Ledoit-Wolf shrinkage covariance (stable
  when N is not much larger than the embedding width); ``mahalanobis_percentile`` ranks it among the
  reference architectures' own (in-sample) Mahalanobis distances.

A reference architecture with the same graph as the model (same :meth:`ComputationGraph.signature`)
is left out of the search, as each reference architecture is left out of its own score; such
matches are listed in ``ShiftReport.matches``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ghnviz.embed.reference import ReferenceSet, uses_imagenet_input
from ghnviz.embed.store import reference_set

if TYPE_CHECKING:
    import os

    import torch.nn as nn

    from ghnviz.hyper.ghn import GHN
    from ghnviz.zoo.deepnets1m.space import ArchSpec

METRIC = 'euclidean distance between embeddings standardised by the reference mean and std'


@dataclass
class Neighbour:
    """A reference architecture near the query."""

    index: int  # row in the reference set
    name: str  # e.g. 'train/17'
    distance: float  # in the standardised embedding space
    description: str  # ArchSpec.describe()
    spec_json: str  # ArchSpec.to_json(): ArchSpec.from_json(...).build(...) rebuilds it
    num_params: int  # of the model as embedded (the GHN's classes and input size)
    n_nodes: int
    depth: int
    avg_degree: float

    def spec(self) -> ArchSpec:
        """The architecture, ready for ``ghnviz.create_model(spec, num_classes=...)``."""
        from ghnviz.zoo.deepnets1m.space import ArchSpec

        return ArchSpec.from_json(self.spec_json)


@dataclass
class ShiftReport:
    """Distribution-shift scores of one model against a reference set (see the module docstring)."""

    percentile: float  # 0-100: rank of `distance` among the reference's leave-one-out k-NN distances
    distance: float  # mean distance to the k nearest reference architectures
    mahalanobis: float  # Ledoit-Wolf Mahalanobis distance to the reference mean
    mahalanobis_percentile: float  # 0-100 among the reference's own Mahalanobis distances
    k: int
    neighbours: list[Neighbour]  # nearest first
    embedding: np.ndarray  # (hid,) the model's graph embedding (raw, not standardised)
    matches: list[str] = field(default_factory=list)  # reference architectures with the same graph
    reference: str = ''  # the reference set's key
    metric: str = METRIC
    seconds: dict[str, float] = field(default_factory=dict)  # graph, embed, score, total

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible data."""
        d = asdict(self)
        d['embedding'] = [float(v) for v in self.embedding]
        return d

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)


# ---- statistics of a reference set (computed once per set and k, kept on the set) ------------------------


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(m, n)`` Euclidean distances between rows of ``a`` and ``b``."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def _mean_smallest(d: np.ndarray, k: int) -> np.ndarray:
    """Mean of the ``k`` smallest entries of each row."""
    return np.partition(d, k - 1, axis=1)[:, :k].mean(1)


def loo_knn_distances(ref: ReferenceSet, k: int) -> np.ndarray:
    """``(N,)`` mean distance of each reference architecture to its ``k`` nearest others."""

    def make() -> np.ndarray:
        z = ref.standardise().astype(np.float64)  # (N, hid)
        d = _pairwise(z, z)  # (N, N)
        np.fill_diagonal(d, np.inf)
        return _mean_smallest(d, min(k, len(ref) - 1))

    return ref._get(('loo_knn', k), make)


def shrunk_precision(ref: ReferenceSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ledoit-Wolf ``(location (hid,), precision (hid, hid), in-sample Mahalanobis distances (N,))``."""

    def make() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from sklearn.covariance import LedoitWolf

        z = ref.standardise().astype(np.float64)
        lw = LedoitWolf().fit(z)
        return lw.location_, lw.precision_, np.sqrt(lw.mahalanobis(z))

    return ref._get('ledoit_wolf', make)


def _percentile(value: float, population: np.ndarray) -> float:
    """Mid-rank percentile (0-100) of ``value`` in ``population``."""
    below = np.count_nonzero(population < value)
    ties = np.count_nonzero(population == value)
    return float(100.0 * (below + 0.5 * ties) / len(population))


# ---- scoring ---------------------------------------------------------------------------------------------


def score_embedding(
    ref: ReferenceSet, embedding: np.ndarray, k: int = 10, signature: str | None = None
) -> ShiftReport:
    """Shift scores of a graph embedding (``(hid,)``) against ``ref``; ``signature`` (of the model's graph)
    leaves reference architectures with the same graph out of the search."""
    t0 = time.perf_counter()
    if not 1 <= k < len(ref):
        raise ValueError(f'k must be in [1, {len(ref) - 1}] for a reference set of {len(ref)}, got {k}')
    emb = np.asarray(embedding, dtype=np.float32).reshape(-1)
    z = ref.standardise(emb).astype(np.float64)  # (1, hid)
    d = _pairwise(z, ref.standardise().astype(np.float64))[0]  # (N,)
    matches: list[str] = []
    if signature is not None:
        same = np.flatnonzero(ref.table['signature'] == signature)
        matches = [str(ref.table['name'][i]) for i in same]
        d[same] = np.inf
    order = np.argsort(d, kind='stable')[:k]
    distance = float(d[order].mean())
    loc, prec, ref_maha = shrunk_precision(ref)
    diff = z[0] - loc
    maha = float(np.sqrt(max(diff @ prec @ diff, 0.0)))
    avg_degree = ref.column('avg_degree')
    neighbours = [
        Neighbour(
            index=int(i),
            name=str(ref.table['name'][i]),
            distance=float(d[i]),
            description=str(ref.table['description'][i]),
            spec_json=str(ref.table['spec'][i]),
            num_params=int(ref.table['num_params'][i]),
            n_nodes=int(ref.table['n_nodes'][i]),
            depth=int(ref.table['depth'][i]),
            avg_degree=float(avg_degree[i]),
        )
        for i in order
    ]
    return ShiftReport(
        percentile=_percentile(distance, loo_knn_distances(ref, k)),
        distance=distance,
        mahalanobis=maha,
        mahalanobis_percentile=_percentile(maha, ref_maha),
        k=k,
        neighbours=neighbours,
        embedding=emb,
        matches=matches,
        reference=ref.key,
        seconds={'score': time.perf_counter() - t0},
    )


def query_model(name: str | ArchSpec, ghn: GHN) -> nn.Module:
    """Build a model by name the way it is scored against ``ghn``'s reference set: the GHN's number of
    classes, eval mode, and 32x32 inputs for a non-ImageNet GHN (torchvision models that
    :func:`~ghnviz.zoo.adapt.adapt_to_small_images` knows are adapted, the others keep 224x224)."""
    from ghnviz.zoo.factory import DEEPNETS_PREFIX, create_model

    imagenet = uses_imagenet_input(ghn)
    if not isinstance(name, str) or name.startswith(DEEPNETS_PREFIX):
        return create_model(name, num_classes=ghn.num_classes, is_imagenet_input=imagenet).eval()
    model = create_model(name, num_classes=ghn.num_classes)
    if not imagenet:
        from ghnviz.zoo.adapt import ADAPTERS, adapt_to_small_images

        if any(isinstance(model, types) for types, _ in ADAPTERS):
            model = adapt_to_small_images(model)
    return model.eval()


def distribution_shift(
    ghn: GHN,
    model: nn.Module | str | ArchSpec,
    k: int = 10,
    reference: ReferenceSet | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ShiftReport:
    """How far ``model`` lies from the architectures ``ghn`` was trained on.

    Args:
        ghn: the GHN whose embedding space is used.
        model: an ``nn.Module`` (scored as it is: its mode and input size decide its graph), a model name
            or an :class:`ArchSpec` (built by :func:`query_model`).
        k: neighbours used for the distance and listed in the report.
        reference: the reference set; None takes the largest stored set of the training split for this
            GHN (assets, then cache), computing the default one (2,000 architectures, minutes) if none exists.
        cache_dir: cache folder for reference sets (default ``~/.cache/ghnviz/embeddings``).

    Returns:
        A :class:`ShiftReport` (see the module docstring for what each number means).
    """
    import torch.nn as nn

    t0 = time.perf_counter()
    if reference is None:
        reference = reference_set(ghn, n=None, cache_dir=cache_dir)
    if not isinstance(model, nn.Module):
        model = query_model(model, ghn)
    t1 = time.perf_counter()
    graph = ghn.graph_for(model)
    t2 = time.perf_counter()
    emb = ghn.embed(model, graph=graph).vector.float().cpu().numpy()  # (hid,)
    t3 = time.perf_counter()
    report = score_embedding(reference, emb, k=k, signature=graph.signature())
    report.seconds = {
        'setup': t1 - t0,
        'graph': t2 - t1,
        'embed': t3 - t2,
        'score': report.seconds['score'],
        'total': time.perf_counter() - t0,
    }
    return report
