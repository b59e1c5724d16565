"""Forward + backward time of the DeepNets-1M ops that ghnviz.fastops speeds up: reference vs fast.

Shapes are those of the CIFAR-10 training networks (batch 32, C=32 at 32x32, doubling at each
reduction; attention over every pixel with 8 heads). Prints the median over ``--reps`` runs after a
warm-up, per op and shape, and the speed-up.

    python benchmarks/bench_ops.py --threads 1
    python benchmarks/bench_ops.py --threads 1 --amp bf16   # as training runs with --amp bf16 on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F


def _time(fn, reps: int, amp: str) -> float:
    ctx = torch.autocast('cpu', dtype=torch.bfloat16) if amp == 'bf16' else contextlib.nullcontext()
    with ctx:
        for _ in range(2):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--reps', type=int, default=7)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--nchw', action='store_true', help='contiguous NCHW inputs (default: channels-last)')
    p.add_argument('--amp', choices=('none', 'bf16'), default='none', help='run the ops under CPU autocast')
    p.add_argument('--only', choices=('all', 'conv', 'msa'), default='all', help='which ops to time')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from ghnviz.fastops import attention, dilated_conv2d, fast_kernels

    fmt = torch.contiguous_format if args.nchw else torch.channels_last
    rows = []
    for c, size in ((32, 32), (64, 16), (128, 8)):
        for k in (3, 5):
            for stride in (1, 2):
                x = torch.randn(args.batch, c, size, size).contiguous(memory_format=fmt).requires_grad_()
                w = torch.randn(c, 1, k, k, requires_grad=True)
                pad = k // 2 * 2

                def ref(x=x, w=w, stride=stride, pad=pad, c=c):
                    y = F.conv2d(x, w, None, stride, pad, 2, c)
                    y.backward(torch.ones_like(y))

                def fast(x=x, w=w, stride=stride, pad=pad, c=c):
                    y = dilated_conv2d(x, w, stride, pad, 2, c)
                    if y is None:  # a case the fast form declines: the caller runs the plain convolution
                        y = F.conv2d(x, w, None, stride, pad, 2, c)
                    y.backward(torch.ones_like(y))

                rows.append((f'dil_conv_{k}x{k} stride {stride}, C={c} {size}x{size}', ref, fast))
    for c, size in ((32, 32), (32, 16), (64, 11), (128, 8)):
        heads, n = 8, size * size
        q, kk, v = (torch.randn(args.batch, heads, n, c // heads, requires_grad=True) for _ in range(3))

        def run(q=q, kk=kk, v=v, c=c, heads=heads):
            y = attention(q, kk, v, (c // heads) ** -0.5)
            y.backward(torch.ones_like(y))

        def ref(run=run):
            with fast_kernels(False):
                run()

        def fast(run=run):
            with fast_kernels():
                run()

        rows.append((f'msa, C={c} {size}x{size} ({n} tokens, 8 heads)', ref, fast))
    if args.only != 'all':
        rows = [r for r in rows if r[0].startswith('dil_conv' if args.only == 'conv' else 'msa')]
    layout = 'NCHW' if args.nchw else 'channels-last'
    print(f'threads={torch.get_num_threads()} batch={args.batch} {layout} amp={args.amp}')
    print(f'{"op":<46} {"reference ms":>12} {"fast ms":>9} {"speed-up":>9}')
    for name, ref, fast in rows:
        tr, tf = _time(ref, args.reps, args.amp), _time(fast, args.reps, args.amp)
        print(f'{name:<46} {tr * 1e3:12.1f} {tf * 1e3:9.1f} {tr / tf:8.1f}x', flush=True)


if __name__ == '__main__':
    main()
