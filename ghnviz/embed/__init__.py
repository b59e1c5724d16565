"""Graph embeddings against a GHN's training distribution.

* :mod:`~ghnviz.embed.reference`: reference sets (embeddings of DeepNets-1M training architectures),
  computed in batches and cached on disk by GHN content hash;
* :mod:`~ghnviz.embed.store`: finding stored sets (shipped assets, cache) and computing missing ones;
* :mod:`~ghnviz.embed.shift`: :func:`distribution_shift` (k-NN percentile, Mahalanobis, neighbours);
* :mod:`~ghnviz.embed.projection`: PCA / UMAP / t-SNE maps of a reference set;
* :mod:`~ghnviz.embed.properties`: regressing architecture properties from embeddings.
"""

from ghnviz.embed.projection import METHODS, Projection, ProjectionParams, projection
from ghnviz.embed.properties import FEATURES, REGRESSORS, TARGETS, PropertyFit, predict_property
from ghnviz.embed.reference import (
    DEFAULT_N,
    DEFAULT_SPLIT,
    ReferenceSet,
    compute_reference,
    default_cache_dir,
    embed_specs,
    ghn_hash,
    uses_imagenet_input,
)
from ghnviz.embed.shift import (
    Neighbour,
    ShiftReport,
    distribution_shift,
    loo_knn_distances,
    query_model,
    score_embedding,
)
from ghnviz.embed.store import find_reference, reference_set, search_dirs

__all__ = [
    'DEFAULT_N',
    'DEFAULT_SPLIT',
    'FEATURES',
    'METHODS',
    'REGRESSORS',
    'TARGETS',
    'Neighbour',
    'Projection',
    'ProjectionParams',
    'PropertyFit',
    'ReferenceSet',
    'ShiftReport',
    'compute_reference',
    'default_cache_dir',
    'distribution_shift',
    'embed_specs',
    'find_reference',
    'ghn_hash',
    'loo_knn_distances',
    'predict_property',
    'projection',
    'query_model',
    'reference_set',
    'score_embedding',
    'search_dirs',
    'uses_imagenet_input',
]
