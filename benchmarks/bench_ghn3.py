"""Times GHN-3 parameter prediction end to end (graph + predict) on freshly built models.

Usage: python benchmarks/bench_ghn3.py [--threads N] [--repeat R] [--file GHN3_FILE] [--profile] [model ...]

For each model, in one warm process (the GHN loaded once, one untimed warm-up call), best of R runs,
each on a newly constructed model (construction not timed):

* ``fresh graph``: ``build_graph(model)`` + ``ghn.predict(model, graph=g)``: nothing cached, the
  graph is traced and planned again;
* ``cached graph``: ``ghn.predict(model)``: the GHN reuses the graph it traced for an earlier model of
  the same architecture (what repeated predictions in the app or in evaluation loops cost);
* ``reference``: the published GHN-3 package, if it is importable (``import ghn3``): its
  ``Graph(model, ve_cutoff=50, dense=True)`` + forward, for comparison.

The default GHN file is the random-weight GHN-3-T of the conformance fixtures (same shapes as the
published ``ghn3tm8``); timings do not depend on the weight values. ``--profile`` prints where the
time of one fresh-graph run goes. On a busy machine the CPU time with ``--threads 1`` is the steadier
figure (what one idle core would take).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import os
import pstats
import time
import warnings
from pathlib import Path

import torch
import torchvision

import ghnviz

warnings.filterwarnings('ignore', category=FutureWarning)  # deprecation notices of the reference package

_DEFAULT_FILE = Path(os.environ.get('GHNVIZ_SHARED', Path(__file__).resolve().parents[2] / 'shared'))
_DEFAULT_FILE = _DEFAULT_FILE / 'conformance' / 'ghn3_tiny_random.joblib'


def _fresh(name: str) -> torch.nn.Module:
    return torchvision.models.get_model(name, num_classes=1000)


def _best(fn, name: str, repeat: int) -> tuple[float, float]:
    """Best wall-clock and best process CPU time of ``repeat`` runs, each on a new model."""
    best, best_cpu = float('inf'), float('inf')
    for _ in range(repeat):
        model = _fresh(name)
        t0, c0 = time.perf_counter(), time.process_time()
        fn(model)
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return best, best_cpu


def _reference(path: Path):
    """The published implementation, loaded from a local file, or None when it is not installed."""
    try:
        from ghn3.graph import Graph, GraphBatch

        ghn3_nn = importlib.import_module('ghn3.nn')  # the package re-exports torch's nn under that name
    except Exception:  # not installed, or its own imports (ppuda, einops, ...) missing
        return None
    download = ghn3_nn.hf_hub_download
    ghn3_nn.hf_hub_download = lambda repo_id, filename: filename  # read the local file instead of the hub
    try:
        ref = ghn3_nn.from_pretrained(str(path)).eval()
    finally:
        ghn3_nn.hf_hub_download = download

    def run(model: torch.nn.Module) -> None:
        graph = Graph(model, ve_cutoff=50, dense=True, verbose=False)
        with torch.no_grad():
            ref(model, GraphBatch([graph], dense=True))

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('models', nargs='*', default=['resnet50', 'vit_b_16'])
    parser.add_argument(
        '--file', type=Path, default=_DEFAULT_FILE, help='GHN-3 checkpoint (default: GHN-3-T shapes)'
    )
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: leave the default)')
    parser.add_argument('--repeat', type=int, default=3, help='best of this many runs')
    parser.add_argument('--profile', action='store_true', help='print a profile of one fresh-graph run')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ghn = ghnviz.load_ghn(args.file)
    ref = _reference(args.file)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, GHN {ghn.arch} {ghn.config}')
    print(f'reference implementation: {"importable" if ref else "not importable, skipped"}')

    def fresh_graph(model):
        ghn.predict(model, graph=ghnviz.build_graph(model, ve_cutoff=ghn.config.ve_cutoff))

    for name in args.models:
        ghn.predict(_fresh(name))  # warm-up: first-call allocations, lazy imports; fills the graph cache
        row = {
            'fresh graph': _best(fresh_graph, name, args.repeat),
            'cached graph': _best(ghn.predict, name, args.repeat),
        }
        if ref is not None:
            ref(_fresh(name))
            row['reference'] = _best(ref, name, args.repeat)
        print(f'{name:18s} ' + '  '.join(f'{k} {w:.3f} s (cpu {c:.3f} s)' for k, (w, c) in row.items()))
        if args.profile:
            model = _fresh(name)
            prof = cProfile.Profile()
            prof.enable()
            fresh_graph(model)
            prof.disable()
            pstats.Stats(prof).sort_stats('tottime').print_stats(15)


if __name__ == '__main__':
    main()
