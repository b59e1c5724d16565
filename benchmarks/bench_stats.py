"""Times ghnviz.weight_stats on torchvision models (random init), with and without reference columns.

Usage: python benchmarks/bench_stats.py [--threads N] [--repeat R] [model ...]

Prints the best wall-clock and process CPU time of R runs; on a busy machine the CPU time with
--threads 1 is the steadier figure (it is what one idle core would take).
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

from ghnviz.stats import weight_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('models', nargs='*', default=['resnet18', 'resnet50', 'convnext_tiny'])
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: leave the default)')
    parser.add_argument('--repeat', type=int, default=3, help='best of this many runs')
    parser.add_argument('--sv-method', default='gram', choices=['gram', 'svdvals'])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, sv_method={args.sv_method}')
    for arch in args.models:
        model = torchvision.models.get_model(arch).eval()
        n = sum(p.numel() for p in model.parameters())
        for ref in (False, True):
            best, best_cpu = float('inf'), float('inf')
            for _ in range(args.repeat):
                t0, c0 = time.perf_counter(), time.process_time()
                df = weight_stats(model, reference_init=ref, sv_method=args.sv_method)
                best = min(best, time.perf_counter() - t0)
                best_cpu = min(best_cpu, time.process_time() - c0)
            print(
                f'{arch:15s} {n / 1e6:6.1f}M params {len(df):4d} rows  reference_init={ref!s:5s}  '
                f'wall {best:.2f} s  cpu {best_cpu:.2f} s'
            )


if __name__ == '__main__':
    main()
