"""Time GHN-2 parameter prediction: graph, predict and total seconds per model (best of N, warm process).

Every repetition predicts into a freshly constructed model. ``trace`` is building the graph from
scratch; ``graph`` is what ``ghn.predict`` spends getting it (a cache hit after the first call, since
the cache is keyed by architecture); ``total`` = ``graph`` + ``predict``.

If the ``ghn3`` package is importable (e.g. on PYTHONPATH), its timings for the same file are printed
alongside for comparison.

    python benchmarks/bench_predict.py [--ghn PATH] [--repeat 3] [--threads N] [models ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torchvision

import ghnviz

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GHN = ROOT.parent / 'shared' / 'conformance' / 'ghn2_cifar10_random.pt'
MODELS = ['resnet18', 'resnet50', 'convnext_tiny', 'vit_b_16']


def bench_ghnviz(ghn, name: str, repeat: int) -> dict[str, float]:
    best = {'trace': float('inf'), 'graph': float('inf'), 'predict': float('inf'), 'total': float('inf')}
    ghn.predict(torchvision.models.get_model(name, num_classes=ghn.num_classes))  # warm-up (fills caches)
    for _ in range(repeat):
        model = torchvision.models.get_model(name, num_classes=ghn.num_classes)
        t = time.perf_counter()
        ghnviz.build_graph(model, ve_cutoff=ghn.config.ve_cutoff)
        best['trace'] = min(best['trace'], time.perf_counter() - t)
        model = torchvision.models.get_model(name, num_classes=ghn.num_classes)
        seconds = ghn.predict(model).seconds
        for k, v in seconds.items():
            best[k] = min(best[k], v)
    return best


def load_other(path: Path):
    """The same file run by the ``ghn3`` package (None when it is not importable)."""
    try:
        from ghn3.graph import Graph, GraphBatch
        from ghn3.nn import GHN3
    except ImportError:
        return None
    ck = torch.load(path, map_location='cpu', weights_only=True)
    ghn = GHN3(**ck['config'], is_ghn2=True)
    state = {
        k: (v.squeeze() if k.startswith('decoder.') and v.dim() == 4 else v)
        for k, v in ck['state_dict'].items()
    }
    ghn.load_state_dict(state)
    return ghn.eval(), Graph, GraphBatch


def bench_other(other, name: str, num_classes: int, repeat: int) -> dict[str, float]:
    ghn, graph_cls, batch_cls = other
    best = {'graph': float('inf'), 'predict': float('inf'), 'total': float('inf')}
    for i in range(repeat + 1):
        model = torchvision.models.get_model(name, num_classes=num_classes)
        t0 = time.perf_counter()
        batch = batch_cls([graph_cls(model, ve_cutoff=50, dense=False, verbose=False)], dense=False)
        t1 = time.perf_counter()
        with torch.no_grad():
            ghn(model, batch)
        t2 = time.perf_counter()
        if i > 0:  # the first run is a warm-up
            for k, v in (('graph', t1 - t0), ('predict', t2 - t1), ('total', t2 - t0)):
                best[k] = min(best[k], v)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('models', nargs='*', default=MODELS)
    parser.add_argument('--ghn', type=Path, default=DEFAULT_GHN)
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument(
        '--threads', type=int, default=None, help='torch intra-op threads (default: torch default)'
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ghn = ghnviz.load_ghn(args.ghn)
    other = load_other(args.ghn)
    print(
        f'GHN {args.ghn.name}, torch {torch.__version__}, {torch.get_num_threads()} threads, '
        f'best of {args.repeat}'
    )
    head = f'{"model":<16}{"trace":>8}{"graph":>8}{"predict":>9}{"total":>8}'
    if other is not None:
        head += f'   | ghn3: {"graph":>7}{"predict":>9}{"total":>8}'
    print(head)
    for name in args.models:
        ours = bench_ghnviz(ghn, name, args.repeat)
        line = f'{name:<16}' + ''.join(
            f'{ours[k]:>{w}.3f}' for k, w in (('trace', 8), ('graph', 8), ('predict', 9), ('total', 8))
        )
        if other is not None:
            ref = bench_other(other, name, ghn.num_classes, args.repeat)
            line += '   |       ' + ''.join(
                f'{ref[k]:>{w}.3f}' for k, w in (('graph', 7), ('predict', 9), ('total', 8))
            )
        print(line, flush=True)


if __name__ == '__main__':
    main()
