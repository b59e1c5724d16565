"""Seconds per GHN training step (meta-batch) and architectures per second.

Default settings are those of the reference GHN-2 CIFAR-10 recipe: m=8 architectures per step, 64 images
of 32x32, widths redrawn per use (C 32-128), GHN-2 with hid=32, node budget 2,200. Two modes:

* ``warm``: the meta-batches are drawn (their networks and graphs built) before timing, as when every
  architecture has been seen before or graphs come precomputed; this is the steady state.
* ``cold``: every step draws new architectures from the whole split, so graphs and networks are built
  inside the timed step.

Prints the median over ``--steps`` timed steps after ``--warmup`` untimed ones, in wall time and in
process CPU time (on a shared machine the CPU time of a 1-thread run is the steadier number). Images are
random (step time does not depend on pixel values).

    python benchmarks/bench_train.py --threads 2
    python benchmarks/bench_train.py --amp bf16 --mode cold
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


class _Replay:
    """Hands out pre-drawn meta-batches in order (the ``warm`` mode's sampler)."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next_batch(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--mode', choices=('warm', 'cold'), default='warm')
    p.add_argument('--arch', default='ghn2')
    p.add_argument('--hid', type=int, default=32)
    p.add_argument('--meta-batch', type=int, default=8)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--max-width', type=int, default=0, help='cap C (0: widths as in the reference, 32-128)')
    p.add_argument('--amp', default='none', choices=('none', 'bf16'))
    p.add_argument('--channels-last', action='store_true')
    p.add_argument(
        '--reference-kernels',
        action='store_true',
        help='run dilated convolutions and attention as the reference writes them (ghnviz train uses the '
        'faster equivalents of ghnviz.fastops)',
    )
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: default)')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args()

    from ghnviz.fastops import fast_kernels
    from ghnviz.train import ArchSampler, MetaBatchPredictor, TrainConfig, _try_step, build_ghn

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = TrainConfig(
        arch=args.arch,
        hid=args.hid,
        meta_batch=args.meta_batch,
        batch_size=args.batch_size,
        max_width=args.max_width,
        amp=args.amp,
        channels_last=args.channels_last,
        seed=args.seed,
        arch_pool=0 if args.mode == 'cold' else 0,
    )
    ghn = build_ghn(cfg, 10).train()
    sampler = ArchSampler(cfg, 10, ghn.config.ve_cutoff)
    n = args.warmup + args.steps
    if args.mode == 'warm':
        t0 = time.perf_counter()
        sampler = _Replay([sampler.next_batch() for _ in range(n)])
        print(f'built {n} meta-batches in {time.perf_counter() - t0:.1f} s (not timed)')
    predictor = MetaBatchPredictor(ghn)
    optimizer = torch.optim.Adam(ghn.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    gen = torch.Generator().manual_seed(args.seed)
    times, cpu, nodes = [], [], []
    for i in range(n):
        x = torch.randn(args.batch_size, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (args.batch_size,), generator=gen)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t0, c0 = time.perf_counter(), time.process_time()
        with fast_kernels(not args.reference_kernels):
            ok, loss, _, archs = _try_step(cfg, predictor, sampler, optimizer, scaler, x, y, 1)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        n_nodes = sum(a.n_nodes for a in archs)
        if i >= args.warmup:
            times.append(dt)
            cpu.append(dc)
            nodes.append(n_nodes)
        print(f'step {i}: {dt:.2f} s ({dc:.2f} s CPU), loss {loss:.3f}, {n_nodes} nodes', flush=True)
    med, med_cpu = statistics.median(times), statistics.median(cpu)
    print(
        f'{args.mode} {args.arch} hid={args.hid} m={args.meta_batch} batch={args.batch_size} amp={args.amp} '
        f'channels_last={args.channels_last} kernels={"reference" if args.reference_kernels else "fast"} '
        f'threads={torch.get_num_threads()}: '
        f'median {med:.2f} s per meta-batch ({med_cpu:.2f} s CPU time; mean {statistics.mean(times):.2f} s, '
        f'{statistics.mean(cpu):.2f} s CPU), {args.meta_batch / med:.2f} archs/s '
        f'({args.meta_batch / med_cpu:.2f} per CPU second; mean nodes {statistics.mean(nodes):.0f})'
    )


if __name__ == '__main__':
    main()
