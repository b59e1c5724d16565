"""Graph build time: ghnviz.build_graph (shape-only trace and plain forward), and the published
GHN-3 builder when it is importable.

Usage:
    python benchmarks/bench_graph.py [--threads 1] [--repeat 3] [model ...]

Prints the best of ``--repeat`` builds per model in a warm process (one untimed build first). The
reference column appears only if ``ghn3`` (and ``ppuda``) are on PYTHONPATH; it is never needed.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

from ghnviz.graph.build import build_graph

MODELS = ['resnet18', 'resnet50', 'convnext_tiny', 'vit_b_16']


def best_of(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def reference_builder():
    """The GHN-3 Graph class, or None when the reference code is not importable."""
    try:
        from ghn3.graph import Graph  # noqa: PLC0415 - optional comparison only
    except Exception:  # noqa: BLE001 - any import problem just disables the column
        return None
    return lambda model: Graph(model, ve_cutoff=50, dense=True, verbose=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('models', nargs='*', default=MODELS)
    parser.add_argument('--threads', type=int, default=1, help='torch intra-op threads')
    parser.add_argument('--repeat', type=int, default=3, help='timed builds per model (best is shown)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref = reference_builder()

    header = f'{"model":<16}{"nodes":>7}{"ghnviz":>10}{"plain fwd":>11}' + (
        f'{"reference":>11}' if ref else ''
    )
    print(f'graph build time, best of {args.repeat} (s), {args.threads} thread(s), torch {torch.__version__}')
    print(header)
    for name in args.models:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, num_classes=1000)
        n = build_graph(model).n_nodes
        fast = best_of(lambda m=model: build_graph(m), args.repeat)
        plain = best_of(lambda m=model: build_graph(m, fast=False), args.repeat)
        line = f'{name:<16}{n:>7}{fast:>10.4f}{plain:>11.4f}'
        if ref:
            line += f'{best_of(lambda m=model: ref(m), args.repeat):>11.4f}'
        print(line, flush=True)


if __name__ == '__main__':
    main()
