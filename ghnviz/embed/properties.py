"""Predicting properties of architectures from their graph embeddings.

A regressor is trained on part of a reference set and scored (R^2, Kendall's tau) on the held-out
rest. Targets are properties that cost nothing to know for every architecture (:data:`TARGETS`);
features are the GHN's graph embeddings or, as a baseline that needs no GHN, the fraction of graph
nodes of each primitive type (:data:`FEATURES`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ghnviz.embed.reference import ReferenceSet

# target name -> values per reference architecture
TARGETS: dict[str, Callable[[ReferenceSet], np.ndarray]] = {
    'log_params': lambda r: r.column('log_params'),  # log10 of the parameter count
    'depth': lambda r: r.column('depth').astype(np.float64),  # longest path in the graph
    'n_nodes': lambda r: r.column('n_nodes').astype(np.float64),
    'avg_degree': lambda r: r.column('avg_degree'),
    'n_cells': lambda r: r.column('n_cells').astype(np.float64),
}

# feature name -> (N, d) inputs of the regressor
FEATURES: dict[str, Callable[[ReferenceSet], np.ndarray]] = {
    'embedding': lambda r: r.standardise().astype(np.float64),
    'op_fractions': lambda r: r.ops / np.maximum(r.ops.sum(1, keepdims=True), 1),
}


def _ridge(seed: int) -> Any:
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))


def _svr(seed: int) -> Any:
    from sklearn.model_selection import GridSearchCV, KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVR

    grid = {'svr__C': [1.0, 10.0, 100.0], 'svr__gamma': ['scale', 0.05, 0.2], 'svr__epsilon': [0.05, 0.1]}
    cv = KFold(3, shuffle=True, random_state=seed)
    return GridSearchCV(make_pipeline(StandardScaler(), SVR(kernel='rbf')), grid, cv=cv)


# regressor name -> factory(seed); targets are standardised before fitting
REGRESSORS: dict[str, Callable[[int], Any]] = {'ridge': _ridge, 'svr': _svr}


@dataclass
class PropertyFit:
    """Held-out scores of one (target, features, regressor) combination."""

    target: str
    features: str
    regressor: str
    r2: float  # coefficient of determination on the held-out architectures
    kendall_tau: float  # rank correlation of predictions and truth on the held-out architectures
    n_train: int
    n_test: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lookup(table: dict, name: str, what: str) -> Any:
    if name not in table:
        raise ValueError(f'unknown {what} {name!r}; known: {sorted(table)}')
    return table[name]


def predict_property(
    reference: ReferenceSet,
    target: str = 'log_params',
    features: str = 'embedding',
    regressor: str = 'ridge',
    test_fraction: float = 0.25,
    seed: int = 0,
) -> PropertyFit:
    """Fit a regressor from ``features`` to ``target`` on a random part of ``reference``; score the rest.

    Args:
        reference: the architectures (and their embeddings).
        target, features, regressor: names in :data:`TARGETS`, :data:`FEATURES`, :data:`REGRESSORS`.
        test_fraction: share of architectures held out.
        seed: seed of the split (and of the SVR's cross-validation folds).
    """
    from scipy.stats import kendalltau
    from sklearn.metrics import r2_score

    y = _lookup(TARGETS, target, 'target')(reference)  # (N,)
    x = _lookup(FEATURES, features, 'features')(reference)  # (N, d)
    make = _lookup(REGRESSORS, regressor, 'regressor')
    n_test = max(2, int(round(len(y) * test_fraction)))
    order = np.random.default_rng(seed).permutation(len(y))
    test, train = order[:n_test], order[n_test:]
    mu, sd = y[train].mean(), max(float(y[train].std()), 1e-12)
    model = make(seed).fit(x[train], (y[train] - mu) / sd)
    pred = model.predict(x[test]) * sd + mu
    tau = kendalltau(y[test], pred).statistic
    return PropertyFit(
        target=target,
        features=features,
        regressor=regressor,
        r2=float(r2_score(y[test], pred)),
        kendall_tau=float(tau) if np.isfinite(tau) else float('nan'),
        n_train=len(train),
        n_test=len(test),
    )
