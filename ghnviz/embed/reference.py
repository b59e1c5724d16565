"""Reference sets: a GHN's graph embeddings of DeepNets-1M training architectures, cached on disk.

A reference set is what "the training distribution" means for the shift score and the projections:
the graph embeddings (mean of the final node embeddings) of the first ``n`` architectures of a split,
together with a description of each architecture (its spec, parameter count, a few graph properties).

Files: ``<hash>_<split>_<n>.npz`` (embeddings as float16 plus the per-architecture table, compressed)
and ``<hash>_<split>_<n>.json`` (a card: GHN, split, how the models were built, timings), where
``<hash>`` is the first 16 hex digits of :func:`ghn_hash`. Sets shipped with ghnviz live in
``assets/embeddings/``; computed ones go to the cache folder (``$GHNVIZ_EMBED_CACHE``, else
``~/.cache/ghnviz/embeddings``). Embeddings are rounded to float16 when computed, so a freshly
computed set and the same set read back from disk give identical results.

Only the graph and the GHN's graph network run: :meth:`GHN.embed` never calls the parameter decoders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ghnviz.graph.core import PRIMITIVES

if TYPE_CHECKING:
    import torch.nn as nn

    from ghnviz.graph.core import ComputationGraph
    from ghnviz.hyper.ghn import GHN
    from ghnviz.zoo.deepnets1m.space import ArchSpec

log = logging.getLogger(__name__)

DEFAULT_N = 2000  # reference architectures: stable 10-NN percentiles; ~0.1 s each on an idle core
DEFAULT_SPLIT = 'train'  # the split the GHNs are trained on
RECIPE_VERSION = 1  # bump when how embeddings are computed changes; older files are then ignored
ASSETS_DIR = Path(__file__).resolve().parents[2] / 'assets' / 'embeddings'
CACHE_ENV = 'GHNVIZ_EMBED_CACHE'
TEXT_COLUMNS = ('name', 'spec', 'description', 'signature')  # per-architecture strings
NUMBER_COLUMNS = ('num_params', 'n_nodes', 'n_edges', 'depth', 'n_cells')  # per-architecture integers

Progress = Callable[[int, int], None]  # (architectures done, total)


def default_cache_dir() -> Path:
    """Folder of computed reference sets: ``$GHNVIZ_EMBED_CACHE``, else ``~/.cache/ghnviz/embeddings``."""
    return Path(os.environ.get(CACHE_ENV) or '~/.cache/ghnviz/embeddings').expanduser()


def ghn_hash(ghn: GHN) -> str:
    """sha256 (hex) of a GHN's architecture, config and state-dict tensors (name, dtype, shape, bytes)."""
    import torch

    h = hashlib.sha256()
    h.update(f'{ghn.arch};{json.dumps(ghn.config.to_dict(), sort_keys=True)};'.encode())
    for name, t in sorted(ghn.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f'{name};{t.dtype};{tuple(t.shape)};'.encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def uses_imagenet_input(ghn: GHN) -> bool:
    """Whether models for this GHN are built for ImageNet-size inputs: GHNs with 1000+ classes (ImageNet)
    are, every other GHN (CIFAR-10/100) gets 32x32 inputs."""
    return int(ghn.num_classes) >= 1000


def reference_stem(ghn_sha: str, split: str, n: int, start: int = 0) -> str:
    """File name stem of a reference set: ``<hash16>_<split>_<n>`` (``_from<start>`` when start > 0)."""
    return f'{ghn_sha[:16]}_{split}_{n}' + (f'_from{start}' if start else '')


# ---- the set itself ------------------------------------------------------------------------------------


@dataclass(eq=False)
class ReferenceSet:
    """Graph embeddings of reference architectures and a table describing each one.

    Attributes:
        embeddings: ``(N, hid)`` float32 (values exactly representable in float16).
        table: per-architecture columns: the strings of :data:`TEXT_COLUMNS` (``spec`` is the
            :meth:`ArchSpec.to_json` text) and the integers of :data:`NUMBER_COLUMNS`.
        ops: ``(N, len(PRIMITIVES))`` node counts per primitive type.
        meta: the card: ``ghn_hash``, ``ghn_arch``, ``ghn_config``, ``split``, ``n``, ``start``,
            ``num_classes``, ``is_imagenet_input``, ``recipe_version``, ``seconds``, ...
        path: the ``.npz`` file it was read from or saved to, if any.
    """

    embeddings: np.ndarray
    table: dict[str, np.ndarray]
    ops: np.ndarray
    meta: dict[str, Any]
    path: Path | None = None
    _derived: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def key(self) -> str:
        """The file stem, unique per (GHN, split, n, start)."""
        m = self.meta
        return reference_stem(m['ghn_hash'], m['split'], m['n'], m.get('start', 0))

    @property
    def names(self) -> list[str]:
        return [str(s) for s in self.table['name']]

    def column(self, name: str) -> np.ndarray:
        """A table column, or a derived one: ``avg_degree`` (2 * edges / nodes), ``log_params`` (log10)."""
        if name == 'avg_degree':
            return 2.0 * self.table['n_edges'] / np.maximum(self.table['n_nodes'], 1)
        if name == 'log_params':
            return np.log10(np.maximum(self.table['num_params'], 1).astype(np.float64))
        return self.table[name]

    def row(self, i: int) -> dict[str, Any]:
        """Everything known about architecture ``i`` as plain values."""
        d: dict[str, Any] = {c: str(self.table[c][i]) for c in TEXT_COLUMNS}
        d.update({c: int(self.table[c][i]) for c in NUMBER_COLUMNS})
        d['avg_degree'] = float(self.column('avg_degree')[i])
        return d

    def to_frame(self):
        """``pandas.DataFrame``, one row per architecture: the table columns plus ``avg_degree``
        (e.g. hover text for a projection plot)."""
        import pandas as pd

        df = pd.DataFrame({c: self.table[c] for c in (*TEXT_COLUMNS, *NUMBER_COLUMNS)})
        df['avg_degree'] = self.column('avg_degree')
        return df

    # statistics shared by the shift score and the projections (computed once, kept on the set)
    def _get(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    @property
    def mean(self) -> np.ndarray:
        """``(hid,)`` per-dimension mean of the embeddings."""
        return self._get('mean', lambda: self.embeddings.mean(0))

    @property
    def scale(self) -> np.ndarray:
        """``(hid,)`` per-dimension standard deviation (floored at 1e-6)."""
        return self._get('scale', lambda: np.maximum(self.embeddings.std(0), 1e-6))

    def standardise(self, x: np.ndarray | None = None) -> np.ndarray:
        """``(m, hid)`` embeddings (the set's own when None) shifted and scaled by the set's mean and std."""
        if x is None:
            return self._get('z', lambda: (self.embeddings - self.mean) / self.scale)
        return (
            np.asarray(x, dtype=np.float32).reshape(-1, self.embeddings.shape[1]) - self.mean
        ) / self.scale

    # ---- disk ----------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``<key>.npz`` and ``<key>.json`` into ``directory``; returns the ``.npz`` path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f'{self.key}.npz'
        arrays = {'embeddings': self.embeddings.astype(np.float16), 'ops': self.ops.astype(np.int32)}
        arrays.update({c: np.asarray(self.table[c], dtype=str) for c in TEXT_COLUMNS})
        arrays.update({c: np.asarray(self.table[c], dtype=np.int64) for c in NUMBER_COLUMNS})
        tmp = path.with_name(path.name + '.tmp.npz')
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
        path.with_suffix('.json').write_text(json.dumps(self.meta, indent=1, sort_keys=True) + '\n')
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceSet:
        """Read a set written by :meth:`save` (the ``.npz`` path; its ``.json`` card sits beside it)."""
        path = Path(path)
        meta = json.loads(path.with_suffix('.json').read_text())
        with np.load(path, allow_pickle=False) as f:
            table = {c: f[c] for c in (*TEXT_COLUMNS, *NUMBER_COLUMNS)}
            return cls(f['embeddings'].astype(np.float32), table, f['ops'].astype(np.int64), meta, path)


# ---- computing --------------------------------------------------------------------------------------------


def architecture_row(model: nn.Module, graph: ComputationGraph) -> tuple[dict[str, Any], np.ndarray]:
    """The numeric table entries of one architecture, and its ``(len(PRIMITIVES),)`` op counts."""
    from ghnviz.graph.export import longest_path_depth

    row = {
        'num_params': int(sum(p.numel() for p in model.parameters())),
        'n_nodes': graph.n_nodes,
        'n_edges': int((graph.adj == 1).sum()),
        'depth': int(longest_path_depth(graph).max()) if graph.n_nodes else 0,
        'n_cells': int(graph.meta.get('n_cells', 1)),
    }
    return row, np.bincount(graph.op_indices, minlength=len(PRIMITIVES))


def embed_specs(ghn: GHN, specs: Sequence[ArchSpec]) -> tuple[np.ndarray, list[dict[str, Any]], np.ndarray]:
    """Build, trace and embed architectures in one batched GHN forward.

    Returns:
        ``(b, hid)`` float32 graph embeddings, one table row per architecture, ``(b, n_primitives)``
        op counts.
    """
    import torch

    from ghnviz.graph.build import build_graph

    imagenet = uses_imagenet_input(ghn)
    models = [s.build(num_classes=ghn.num_classes, is_imagenet_input=imagenet).eval() for s in specs]
    graphs = [build_graph(m, ve_cutoff=ghn.config.ve_cutoff) for m in models]
    embs = ghn.embed(models, graph=graphs)
    vectors = torch.stack([e.vector for e in embs]).float().cpu().numpy()  # (b, hid)
    rows, ops = [], []
    for spec, model, graph in zip(specs, models, graphs):
        row, counts = architecture_row(model, graph)
        row.update(
            name=spec.name or '',
            spec=spec.to_json(),
            description=spec.describe(),
            signature=graph.signature(),
        )
        rows.append(row)
        ops.append(counts)
    return vectors, rows, np.stack(ops)


_WORKER: dict[str, Any] = {}


def _init_worker(ghn: GHN) -> None:
    import torch

    torch.set_num_threads(1)
    _WORKER['ghn'] = ghn


def _embed_in_worker(spec_jsons: list[str]) -> tuple[np.ndarray, list[dict[str, Any]], np.ndarray]:
    from ghnviz.zoo.deepnets1m.space import ArchSpec

    return embed_specs(_WORKER['ghn'], [ArchSpec.from_json(s) for s in spec_jsons])


def compute_reference(
    ghn: GHN,
    n: int = DEFAULT_N,
    split: str = DEFAULT_SPLIT,
    start: int = 0,
    batch_size: int = 8,
    workers: int = 1,
    progress: Progress | None = None,
) -> ReferenceSet:
    """Embed architectures ``start .. start + n - 1`` of a DeepNets-1M split (nothing is read or written).

    Args:
        ghn: the GHN (its weights, config and class count decide the embeddings).
        n, split, start: which architectures.
        batch_size: architectures per GHN forward (models of a batch are held in memory together).
        workers: processes that build and trace models in parallel (1 = in this process).
        progress: called with (done, total) after each batch.
    """
    from ghnviz.zoo.deepnets1m.space import sample_architectures

    t0, cpu0 = time.perf_counter(), time.process_time()
    specs = sample_architectures(split, n, start)
    chunks = [specs[i : i + batch_size] for i in range(0, len(specs), batch_size)]
    vectors, rows, ops = [], [], []

    def collect(result: tuple[np.ndarray, list[dict[str, Any]], np.ndarray]) -> None:
        vectors.append(result[0])
        rows.extend(result[1])
        ops.append(result[2])
        if progress is not None:
            progress(len(rows), len(specs))

    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context('spawn')
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(ghn,)) as pool:
            for result in pool.map(_embed_in_worker, [[s.to_json() for s in c] for c in chunks]):
                collect(result)
    else:
        for chunk in chunks:
            collect(embed_specs(ghn, chunk))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    emb = np.concatenate(vectors).astype(np.float16).astype(np.float32)  # (n, hid), float16 values
    table = {c: np.asarray([r[c] for r in rows], dtype=str) for c in TEXT_COLUMNS}
    table.update({c: np.asarray([r[c] for r in rows], dtype=np.int64) for c in NUMBER_COLUMNS})
    meta = {
        'ghn_hash': ghn_hash(ghn),
        'ghn_arch': ghn.arch,
        'ghn_config': ghn.config.to_dict(),
        'split': split,
        'n': n,
        'start': start,
        'num_classes': int(ghn.num_classes),
        'is_imagenet_input': uses_imagenet_input(ghn),
        'embedding': 'mean of the final node embeddings',
        'recipe_version': RECIPE_VERSION,
        'seconds': round(seconds, 2),  # wall time
        'cpu_seconds': round(cpu_seconds, 2),  # CPU time of this process (workers not counted)
        'workers': workers,
        'created': time.strftime('%Y-%m-%dT%H:%M:%S'),
    }
    log.info('embedded %d %s architectures in %.1f s (%.3f s each)', n, split, seconds, seconds / max(n, 1))
    return ReferenceSet(emb, table, np.concatenate(ops).astype(np.int64), meta)
