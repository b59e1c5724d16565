"""Accuracy of predicted parameters, without any training, over a set of architectures.

The protocol of the GHN-2 evaluation: every network gets its parameters from one GHN forward, batch norm
normalises with the statistics of each test batch (predicted networks have no running statistics;
:func:`ghnviz.use_batch_statistics`), other layers run in eval mode, and top-1 accuracy is measured on the
test set in one fixed shuffled order (seed 0) with batches of 64. Besides the first ``n`` architectures
of a DeepNets-1M split, torchvision baselines (ResNet-18 and ResNet-50 adapted to 32x32 inputs) are
evaluated the same way.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ghnviz.fastops import fast_kernels

log = logging.getLogger(__name__)


def _test_batches(
    dataset: str,
    data_path: str | os.PathLike | None,
    batch_size: int,
    max_batches: int | None,
    device,
    limit_per_class: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The normalised test set as a list of batches (computed once, reused for every network)."""
    from ghnviz.data import BatchLoader, load_dataset

    data = load_dataset(dataset, data_path, 'test', limit_per_class=limit_per_class)
    # Image folders list the test set class by class; batch statistics need mixed batches, so the images
    # are put in one fixed random order (seed 0), like the interleaved order of the original test files.
    loader = BatchLoader(data, batch_size, shuffle=True, augment=False, seed=0, device=device)
    out = []
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        out.append(batch)
    return out


@torch.inference_mode()
def accuracy(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy (percent) of ``model`` over ``batches``, as the model is (mode included)."""
    correct = total = 0
    for x, y in batches:
        out = model(x)
        logits = out[0] if isinstance(out, tuple) else out  # (B, num_classes)
        correct += (logits.argmax(1) == y).sum().item()
        total += len(y)
    return 100.0 * correct / max(total, 1)


def evaluate_model(ghn, model: nn.Module, batches, name: str = '') -> dict[str, Any]:
    """Predict ``model``'s parameters with ``ghn`` and measure its accuracy with batch statistics."""
    from ghnviz.hyper.predict import use_batch_statistics

    t0 = time.perf_counter()
    model = model.to(ghn.device).eval()
    pred = ghn.predict(model)
    use_batch_statistics(model)
    t1 = time.perf_counter()
    top1 = accuracy(model, batches)
    return {
        'name': name,
        'top1': round(top1, 3),
        'params': sum(p.numel() for p in model.parameters()),
        'predicted_tensors': len(pred.predicted),
        'skipped_tensors': len(pred.skipped),
        'predict_s': round(t1 - t0, 3),
        'eval_s': round(time.perf_counter() - t1, 3),
    }


@fast_kernels()
def evaluate_ghn(
    ghn: Any,
    split: str = 'test',
    n: int = 100,
    start: int = 0,
    dataset: str = 'cifar10',
    data_path: str | os.PathLike | None = None,
    batch_size: int = 64,
    max_batches: int | None = None,
    limit_per_class: int | None = None,
    baselines: Sequence[str] = ('resnet18', 'resnet50'),
    device: str | torch.device = 'cpu',
    progress: bool = False,
) -> dict[str, Any]:
    """Top-1 accuracy of predicted parameters for architectures ``start..start+n-1`` of a DeepNets-1M split.

    Args:
        ghn: a GHN, or a checkpoint path / registered name for :func:`ghnviz.load_ghn`.
        split: DeepNets-1M split (``'test'``, ``'wide'``, ``'deep'``, ...).
        n: number of architectures.
        start: index of the first one.
        dataset: dataset name (its test split is used); its classes must match the GHN's.
        data_path: where the dataset lives (see :func:`ghnviz.data.load_dataset`).
        batch_size: test batch size (batch statistics depend on it; the reference uses 64).
        max_batches: evaluate on the first ``max_batches`` batches only.
        limit_per_class: use only the first K test images of each class (quick checks).
        baselines: torchvision model names, adapted to 32x32 inputs, also evaluated.
        device: where networks run.
        progress: show a tqdm progress bar.

    Returns:
        ``mean_top1`` (percent, over the split's architectures), ``std_top1``, ``median_top1``, ``n``,
        ``results`` (one dict per architecture), ``baselines`` (name -> result) and the settings used.

    Raises:
        ValueError: an unknown baseline name (checked before anything is evaluated).
    """
    from ghnviz.hyper.io import load_ghn
    from ghnviz.zoo.adapt import adapt_to_small_images
    from ghnviz.zoo.factory import check_model_name, create_model

    for b in baselines:  # before any work: a typo should not cost an evaluation
        check_model_name(b)
    label = str(ghn) if not isinstance(ghn, nn.Module) else type(ghn).__name__
    if not isinstance(ghn, nn.Module):
        ghn = load_ghn(ghn, device=device)
    ghn = ghn.eval()
    t0 = time.perf_counter()
    batches = _test_batches(dataset, data_path, batch_size, max_batches, ghn.device, limit_per_class)
    n_images = sum(len(y) for _, y in batches)
    names = [f'{split}/{i}' for i in range(start, start + n)]
    jobs = [
        (name, lambda name=name: create_model(f'deepnets1m:{name}', ghn.num_classes, is_imagenet_input=False))
        for name in names
    ]
    jobs += [(b, lambda b=b: adapt_to_small_images(create_model(b, ghn.num_classes))) for b in baselines]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc='evaluate', dynamic_ncols=True)
    results, base = [], {}
    for name, make in jobs:
        torch.manual_seed(0)  # initial values of tensors the GHN leaves alone (none in DeepNets-1M nets)
        res = evaluate_model(ghn, make(), batches, name)
        (results.append(res) if name in names else base.__setitem__(name, res))
        log.info('%s: top-1 %.2f%%', name, res['top1'])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(last=f'{res["top1"]:.1f}', refresh=False)
    if bar is not None:
        bar.close()
    top1 = [r['top1'] for r in results]
    return {
        'ghn': label,
        'split': split,
        'start': start,
        'n': len(results),
        'dataset': dataset,
        'n_images': n_images,
        'batch_size': batch_size,
        'limit_per_class': limit_per_class,
        'bn': 'batch statistics',
        'mean_top1': round(statistics.fmean(top1), 3) if top1 else None,
        'std_top1': round(statistics.pstdev(top1), 3) if top1 else None,
        'median_top1': round(statistics.median(top1), 3) if top1 else None,
        'max_top1': max(top1) if top1 else None,
        'results': results,
        'baselines': base,
        'seconds': round(time.perf_counter() - t0, 1),
    }


def format_results(result: dict[str, Any], limit: int = 20) -> str:
    """A short text table of an :func:`evaluate_ghn` result."""
    lines = [f'{"architecture":<16} {"top-1 %":>8} {"params":>10}']
    rows = result['results']
    for r in rows[:limit]:
        lines.append(f'{r["name"]:<16} {r["top1"]:>8.2f} {r["params"]:>10,}')
    if len(rows) > limit:
        lines.append(f'... {len(rows) - limit} more')
    for name, r in result['baselines'].items():
        lines.append(f'{name:<16} {r["top1"]:>8.2f} {r["params"]:>10,}')
    if rows:
        lines.append(
            f'mean top-1 over {result["n"]} {result["split"]} architectures: {result["mean_top1"]:.2f}% '
            f'(std {result["std_top1"]:.2f}, median {result["median_top1"]:.2f}, '
            f'max {result["max_top1"]:.2f}; '
            f'{result["n_images"]} {result["dataset"]} test images, batch statistics)'
        )
    return '\n'.join(lines)
