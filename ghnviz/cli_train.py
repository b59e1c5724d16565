"""Sub-commands ``train`` (GHN meta-training) and ``evaluate`` (accuracy of predicted parameters).

Every :class:`~ghnviz.train.TrainConfig` field is an option of ``train`` (``max_shape`` ->
``--max-shape 64,64,11,11``; booleans take ``--ve/--no-ve``), with the field's comment as help text.
Under ``torchrun --nproc_per_node=N -m ghnviz train ...`` each process trains one replica (DDP).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
import typing


def _field_help(cls) -> dict[str, str]:
    """Field name -> the comment after its default in the class source."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    pattern = re.compile(r'^\s+(\w+): [^=]+=.*?#\s*(.+)$')
    return {m.group(1): m.group(2).strip() for m in map(pattern.match, source.splitlines()) if m}


def _tuple_parser(kind):
    def parse(text: str):
        return tuple(kind(v) for v in text.replace(' ', '').split(',') if v)

    return parse


def _optional_parser(kind):
    def parse(text: str):
        return None if text.lower() in ('none', '') else kind(text)

    return parse


def _add_config_options(p: argparse.ArgumentParser, cls) -> None:
    helps = _field_help(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = '--' + f.name.replace('_', '-')
        default = f.default
        text = f'{helps.get(f.name, "")} (default: {default})'
        hint = hints[f.name]
        if hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(default, tuple):
            p.add_argument(
                flag, type=_tuple_parser(type(default[0])), default=None, help=text, metavar='A,B,...'
            )
        elif default is None:
            kind = next(a for a in typing.get_args(hint) if a is not type(None))
            p.add_argument(flag, type=_optional_parser(kind), default=None, help=text)
        else:
            p.add_argument(flag, type=type(default), default=None, help=text)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from ghnviz.train import TrainConfig

    t = sub.add_parser(
        'train',
        help='meta-train a GHN on DeepNets-1M architectures (CPU, CUDA, torchrun DDP)',
        description='Meta-train a GHN. Launch with torchrun --nproc_per_node=N -m ghnviz train ... for DDP.',
    )
    _add_config_options(t, TrainConfig)
    t.add_argument(
        '--resume',
        action='store_true',
        help='continue from the checkpoint in --out-dir if there is one (weights, optimizer state, '
        "step count, data streams); this call's --steps, --lr and --weight-decay apply from there on",
    )
    t.add_argument(
        '--max-minutes',
        type=float,
        default=None,
        help='stop after this many minutes of this call, with a checkpoint (--resume continues); '
        'touching OUT_DIR/STOP does the same at any time',
    )
    t.add_argument('--no-progress', action='store_true', help='no progress bar')
    t.set_defaults(func=_train)

    e = sub.add_parser(
        'evaluate',
        help='top-1 accuracy of predicted parameters on a DeepNets-1M split (plus ResNet-18/50)',
    )
    e.add_argument('--ghn', required=True, help="GHN checkpoint file or name ('default', official names)")
    e.add_argument('--split', default='test', help='DeepNets-1M split (default: test)')
    e.add_argument('--n', type=int, default=100, help='first N architectures of the split (default: 100)')
    e.add_argument('--start', type=int, default=0, help='index of the first architecture (default: 0)')
    e.add_argument('--dataset', default='cifar10', help='dataset name (default: cifar10)')
    e.add_argument('--data-path', default=None, help='dataset archive, folder or torchvision root')
    e.add_argument(
        '--batch-size', type=int, default=64, help='test batch size (default: 64, as the reference)'
    )
    e.add_argument('--max-batches', type=int, default=None, help='evaluate on at most this many batches')
    e.add_argument('--limit-per-class', type=int, default=None, help='use the first K test images per class')
    e.add_argument(
        '--baselines',
        default='resnet18,resnet50',
        help='torchvision models adapted to 32x32 also evaluated (comma-separated; "" or none for none)',
    )
    e.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'auto' (default: cpu)")
    e.add_argument('--threads', type=int, default=0, help='torch CPU threads (0 = default)')
    e.add_argument('--json', default=None, help='write the results to this JSON file')
    e.add_argument('--no-progress', action='store_true', help='no progress bar')
    e.set_defaults(func=_evaluate)


def _train(args: argparse.Namespace) -> int:
    import logging
    import os

    from ghnviz.train import TrainConfig, train

    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if getattr(args, f.name) is not None
    }
    cfg = TrainConfig(**values)
    if int(os.environ.get('RANK', '0')) == 0:
        logging.getLogger('ghnviz').setLevel(logging.INFO)
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise ValueError(f'--max-minutes must be positive, got {args.max_minutes}')
    max_seconds = None if args.max_minutes is None else 60.0 * args.max_minutes
    summary = train(cfg, resume=args.resume, progress=not args.no_progress, max_seconds=max_seconds)
    if int(os.environ.get('RANK', '0')) == 0:
        print(json.dumps(summary, indent=1))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from ghnviz.evaluate import evaluate_ghn, format_results

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    listed = '' if args.baselines.strip().lower() == 'none' else args.baselines
    baselines = tuple(b.strip() for b in listed.split(',') if b.strip())
    result = evaluate_ghn(
        args.ghn,
        split=args.split,
        n=args.n,
        start=args.start,
        dataset=args.dataset,
        data_path=args.data_path,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        limit_per_class=args.limit_per_class,
        baselines=baselines,
        device=args.device,
        progress=not args.no_progress,
    )
    print(format_results(result))
    if args.json:
        from pathlib import Path

        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f'wrote {path}', file=sys.stderr)
    return 0
