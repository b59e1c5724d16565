"""Cached loaders shared by the pages.

Cached objects are shared by every session and must never be changed: the GHN is only asked to
predict into fresh models (:func:`make_model` builds a new one each time), graphs are only read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import streamlit as st

from .state import PASTED, ModelSpec, ghn_device, ghn_source

if TYPE_CHECKING:
    from torch import nn

    from ghnviz.graph.core import ComputationGraph
    from ghnviz.hyper.ghn import GHN
    from ghnviz.runs import RunStore

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CARD_PATH = REPO / 'assets' / 'ghn_default.json'
DEFAULT_NUM_CLASSES = 10  # classifier size when no GHN is loaded


@st.cache_resource(show_spinner='Loading the GHN…', max_entries=4)
def load_ghn_cached(source: str, device: str) -> GHN:
    """The GHN at ``source`` on ``device``, loaded once per process (shared; never train or change it)."""
    import ghnviz

    return ghnviz.load_ghn(source, device=device)


def current_ghn() -> tuple[GHN | None, Exception | None]:
    """The session's GHN, or the reason it could not be loaded."""
    try:
        return load_ghn_cached(ghn_source(), ghn_device()), None
    except Exception as exc:  # noqa: BLE001 - shown by the caller
        return None, exc


def ghn_resolved_path(source: str) -> str:
    """The local file behind a GHN source (a path or a name)."""
    from ghnviz.hyper.io import resolve_checkpoint

    return str(resolve_checkpoint(source))


def ghn_facts(ghn: GHN) -> dict[str, Any]:
    """Plain facts about a GHN for display."""
    cfg = ghn.config.to_dict() if hasattr(ghn.config, 'to_dict') else dict(vars(ghn.config))
    return {
        'architecture': getattr(ghn, 'arch', type(ghn).__name__),
        'parameters': sum(p.numel() for p in ghn.parameters()),
        'device': str(ghn.device),
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
    }


def ghn_card() -> dict | None:
    """The shipped GHN's card (``assets/ghn_default.json``), if present."""
    if not CARD_PATH.is_file():
        return None
    try:
        return json.loads(CARD_PATH.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning('cannot read %s: %s', CARD_PATH, exc)
        return None


@st.cache_data(show_spinner=False, max_entries=2)
def ghn_training_curve(relative_path: str, window: int = 50) -> list[dict] | None:
    """The learning curve a card names (a ``metrics.csv`` relative to the repository), in windows of steps."""
    from ghnviz.train import learning_curve

    path = REPO / relative_path
    try:
        return learning_curve(path, window=window) if path.is_file() else None
    except (OSError, KeyError, ValueError) as exc:
        log.warning('cannot read the learning curve %s: %s', path, exc)
        return None


def save_upload(name: str, data: bytes) -> Path:
    """Keep an uploaded checkpoint in ghnviz's cache folder (named by content) and return its path."""
    from ghnviz.hyper.hub import cache_dir

    digest = hashlib.sha256(data).hexdigest()[:16]
    safe = ''.join(c if c.isalnum() or c in '._-' else '_' for c in Path(name).name)[-80:]
    path = cache_dir() / 'uploads' / f'{digest}-{safe}'
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return path


def num_classes_for(ghn: GHN | None) -> int:
    return int(ghn.num_classes) if ghn is not None else DEFAULT_NUM_CLASSES


def pasted_of(spec: ModelSpec):
    from ghnviz.zoo.pasted import PastedModel

    return PastedModel.from_json(spec.pasted)


def make_model(spec: ModelSpec, num_classes: int, seed: int = 0) -> nn.Module:
    """A freshly initialised model for ``spec`` (never cached: callers may write into it).

    The initialisation is drawn under ``seed`` (the global RNG is forked, so callers' random
    state is untouched): the same spec always shows the same default weights.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.source == PASTED:
            from ghnviz.zoo.pasted import build_pasted

            return build_pasted(pasted_of(spec))
        from ghnviz.finetune import build_model

        return build_model(spec.name, num_classes, spec.image_size)


@st.cache_resource(show_spinner='Tracing the computation graph…', max_entries=32)
def graph_for(key: str, num_classes: int, _spec: ModelSpec) -> ComputationGraph:
    """The spec's computation graph (shared; read only). Pasted code: the graph its check built."""
    if _spec.source == PASTED:
        return pasted_of(_spec).computation_graph()

    from ghnviz.graph.build import build_graph

    return build_graph(make_model(_spec, num_classes))


@st.cache_resource(show_spinner='Computing weight statistics…', max_entries=16)
def init_stats(key: str, num_classes: int, _spec: ModelSpec):
    """Weight statistics of the spec's default initialisation (shared; read only)."""

    from ghnviz.stats import weight_stats

    return weight_stats(make_model(_spec, num_classes), reference_init=False)


@st.cache_resource(max_entries=4)
def run_store(path: str) -> RunStore:
    """One run store connection per database file (thread-safe, shared)."""
    from ghnviz.runs import RunStore

    return RunStore(path)


def default_run_store() -> RunStore:
    from ghnviz.runs import default_db_path

    return run_store(str(default_db_path()))
