"""2-D (or 3-D) maps of a reference set's graph embeddings, with new models placed on them.

Methods (:data:`METHODS`): ``pca`` (scikit-learn) and ``umap`` (umap-learn) are fitted on the reference
set and place new points with ``transform``; ``tsne`` (scikit-learn) has no transform, so placing new
points refits it on reference + new points together (the reference points move too, and the result
for the same points is reproducible only with the same seed and the same query points).

All methods see the embeddings standardised by the reference mean and std, the space the shift
score uses (:mod:`ghnviz.embed.shift`). Seeds are explicit; fitted projections are cached per
(reference set, method, parameters) by :func:`projection`.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ghnviz.embed.reference import ReferenceSet


@dataclass(frozen=True)
class ProjectionParams:
    """Settings of a projection (the defaults are each library's own)."""

    n_components: int = 2  # 2-D maps for scatter plots
    seed: int = 0  # random_state of UMAP (PCA and t-SNE with its PCA initialisation are deterministic)
    n_neighbors: int = 15  # UMAP: local neighbourhood size (umap-learn default); clipped to N - 1
    min_dist: float = 0.1  # UMAP: how tightly points pack (umap-learn default)
    perplexity: float = 30.0  # t-SNE: effective neighbours (scikit-learn default); clipped below N / 3


def _fit_pca(x: np.ndarray, p: ProjectionParams) -> tuple[Any, np.ndarray]:
    from sklearn.decomposition import PCA

    model = PCA(n_components=p.n_components, svd_solver='full', random_state=p.seed)
    return model, model.fit_transform(x)


def _fit_umap(x: np.ndarray, p: ProjectionParams) -> tuple[Any, np.ndarray]:
    import umap  # heavy (numba): imported only when used

    model = umap.UMAP(
        n_components=p.n_components,
        n_neighbors=max(2, min(p.n_neighbors, len(x) - 1)),
        min_dist=p.min_dist,
        random_state=p.seed,
        transform_seed=p.seed,
        n_jobs=1,  # a fixed random_state runs single-threaded anyway; saying so silences umap's warning
    )
    return model, model.fit_transform(x)


def _fit_tsne(x: np.ndarray, p: ProjectionParams) -> tuple[Any, np.ndarray]:
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    perplexity = min(p.perplexity, max(1.0, (len(x) - 1) / 3.0))
    model = TSNE(n_components=p.n_components, perplexity=perplexity, init='pca', random_state=p.seed)
    # One OpenMP thread: a few thousand points take seconds, while a thread pool on a busy (shared)
    # CPU can stall for minutes.
    with threadpool_limits(limits=1, user_api='openmp'):
        return None, model.fit_transform(x)


# method -> (fit(x, params) -> (fitted model or None, coordinates), can place new points with transform)
METHODS: dict[str, tuple[Any, bool]] = {
    'pca': (_fit_pca, True),
    'umap': (_fit_umap, True),
    'tsne': (_fit_tsne, False),
}


class Projection:
    """A fitted low-dimensional map of reference embeddings.

    Example::

        proj = Projection('umap', n_neighbors=30).fit(ref)
        proj.reference_coords          # (N, 2)
        proj.transform(report.embedding)  # (1, 2)
    """

    def __init__(self, method: str = 'pca', **params: Any):
        if method not in METHODS:
            raise ValueError(f'unknown projection method {method!r}; known: {sorted(METHODS)}')
        self.method = method
        self.params = ProjectionParams(**params)
        self.reference_coords: np.ndarray | None = None  # (N, n_components) after fit
        self._model: Any = None
        self._mean: np.ndarray | None = None
        self._scale: np.ndarray | None = None
        self._x: np.ndarray | None = None  # standardised reference (kept for t-SNE refits)

    @property
    def can_transform(self) -> bool:
        """Whether new points are placed on the fitted map (False: t-SNE refits with them)."""
        return METHODS[self.method][1]

    def _standardise(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return ((x.reshape(-1, self._mean.shape[0]) - self._mean) / self._scale).astype(np.float32)

    def fit(self, reference: ReferenceSet | np.ndarray) -> Projection:
        """Fit on a reference set (or an ``(N, hid)`` array, standardised by its own mean and std)."""
        if isinstance(reference, ReferenceSet):
            self._mean, self._scale = reference.mean, reference.scale
            x = reference.embeddings
        else:
            x = np.asarray(reference, dtype=np.float32)
            self._mean, self._scale = x.mean(0), np.maximum(x.std(0), 1e-6)
        self._x = self._standardise(x)
        fit = METHODS[self.method][0]
        self._model, coords = fit(self._x, self.params)
        self.reference_coords = np.asarray(coords, dtype=np.float32)
        return self

    def place(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(reference coords (N, c), coords of x (m, c))`` for raw embeddings ``x`` (``(m, hid)``).

        For PCA and UMAP the reference coordinates are the fitted ones; for t-SNE both come from one
        refit on reference + ``x`` (nothing on this object changes).
        """
        if self.reference_coords is None:
            raise RuntimeError('call fit() first')
        z = self._standardise(x)
        if self.can_transform:
            return self.reference_coords, np.asarray(self._model.transform(z), dtype=np.float32)
        _, coords = METHODS[self.method][0](np.concatenate([self._x, z]), self.params)
        coords = np.asarray(coords, dtype=np.float32)
        n = len(self._x)
        return coords[:n], coords[n:]

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``(m, c)`` coordinates of raw embeddings ``x`` (``(m, hid)`` or ``(hid,)``); see :meth:`place`."""
        return self.place(x)[1]


_FITTED: OrderedDict[tuple, Projection] = OrderedDict()
_MAX_FITTED = 8


def projection(reference: ReferenceSet, method: str = 'pca', **params: Any) -> Projection:
    """A :class:`Projection` fitted on ``reference``, cached per (reference set, method, parameters).

    Sets read from (or saved to) disk are cached; the returned object is then shared: use
    :meth:`Projection.place` / :meth:`Projection.transform` (which change nothing on it), never refit it.
    """
    p = ProjectionParams(**params)
    if reference.path is None:  # a set that was never saved has no stable identity: fit it afresh
        return Projection(method, **dataclasses.asdict(p)).fit(reference)
    key = (reference.key, str(reference.path), method, dataclasses.astuple(p))
    proj = _FITTED.get(key)
    if proj is None:
        proj = Projection(method, **dataclasses.asdict(p)).fit(reference)
        while len(_FITTED) >= _MAX_FITTED:
            _FITTED.popitem(last=False)
        _FITTED[key] = proj
    else:
        _FITTED.move_to_end(key)
    return proj
