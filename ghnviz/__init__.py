"""ghnviz: Graph HyperNetworks (GHN-2, GHN-3) as a library, a command line and a Streamlit app.

The public API is re-exported here name by name. Submodules are imported lazily on first use so
that ``import ghnviz`` stays cheap (no torch import until a function needs it).
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = '0.1.0'

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    'PRIMITIVES': 'ghnviz.graph.core',
    'ComputationGraph': 'ghnviz.graph.core',
    'Node': 'ghnviz.graph.core',
    'build_graph': 'ghnviz.graph.build',
    'load_ghn': 'ghnviz.hyper.io',
    'save_ghn': 'ghnviz.hyper.io',
    'Prediction': 'ghnviz.hyper.predict',
    'use_batch_statistics': 'ghnviz.hyper.predict',
    'create_model': 'ghnviz.zoo.factory',
    'list_models': 'ghnviz.zoo.factory',
    'postprocess': 'ghnviz.postprocess',
    'weight_stats': 'ghnviz.stats',
    'compare_stats': 'ghnviz.stats',
    'model_summary_stats': 'ghnviz.stats',
    'load_dataset': 'ghnviz.data',
    'get_loaders': 'ghnviz.data',
    'finetune': 'ghnviz.finetune',
    'distribution_shift': 'ghnviz.embed',
}

__all__ = sorted(_EXPORTS) + ['__version__']


class _Package(types.ModuleType):
    """Keeps exported functions that share a submodule's name (``postprocess``, ``finetune``).

    Importing ``ghnviz.postprocess`` makes Python set the package attribute ``postprocess`` to the
    submodule, which would hide the function ``ghnviz.postprocess``. Such assignments are dropped
    here; the submodule stays reachable as ``sys.modules['ghnviz.postprocess']``.
    """

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f'module "ghnviz" has no attribute {name!r}')
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
