"""The public API: every exported name resolves, and functions named like submodules stay functions."""

from __future__ import annotations

import importlib
import subprocess
import sys

import ghnviz


def test_every_exported_name_resolves():
    for name in ghnviz.__all__:
        assert getattr(ghnviz, name) is not None, name


def test_functions_named_like_submodules_survive_submodule_imports():
    importlib.import_module('ghnviz.postprocess')
    importlib.import_module('ghnviz.finetune')
    assert callable(ghnviz.postprocess) and ghnviz.postprocess.__module__ == 'ghnviz.postprocess'
    assert callable(ghnviz.finetune) and ghnviz.finetune.__module__ == 'ghnviz.finetune'


def test_import_is_cheap():
    # `import ghnviz` must not import torch (lazy public API, no import-time side effects)
    code = 'import sys, ghnviz; print("torch" in sys.modules)'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == 'False'
