"""Times the first decode of a CIFAR-10 JPEG archive (all splits), the cached load and one epoch of batches.

Usage: python benchmarks/bench_data.py ARCHIVE [--threads N] [--batch-size B] [--image-size S]
The cache goes to a fresh temporary folder, so the first load always decodes.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from ghnviz.data import BatchLoader, load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('archive', help='cifar10-jpeg.tar.xz (ImageFolder layout)')
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: leave the default)')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--image-size', type=int, default=None, help='resize batches (e.g. 224)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads')
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        train = load_dataset('cifar10', args.archive, 'train', cache_dir=cache)
        first = time.perf_counter() - t0
        print(
            f'first load (read archive + decode train and test + write cache): {first:.2f} s '
            f'(read {train.info["read_s"]:.2f} s, decode train {train.info["decode_s"]:.2f} s)'
        )
        for split in ('train', 'test'):
            t0 = time.perf_counter()
            ds = load_dataset('cifar10', args.archive, split, cache_dir=cache)
            print(f'cached load {split}: {time.perf_counter() - t0:.3f} s, {tuple(ds.images.shape)} uint8')
        loader = BatchLoader(train, args.batch_size, shuffle=True, augment=True, image_size=args.image_size)
        t0 = time.perf_counter()
        n = sum(len(y) for _, y in loader)
        dt = time.perf_counter() - t0
        print(f'one augmented epoch: {n} images in {dt:.2f} s ({n / dt:,.0f} images/s)')


if __name__ == '__main__':
    main()
