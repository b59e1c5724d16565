"""Sub-command `embed`: reference sets of graph embeddings, distribution-shift scores, property regression."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_N = 2000  # same as ghnviz.embed.DEFAULT_N (not imported here: --help stays light)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser('embed', help="GHN graph embeddings against the GHN's training distribution")
    cmds = p.add_subparsers(dest='embed_command', metavar='ACTION')

    def common(q: argparse.ArgumentParser, n_default: int | None) -> None:
        q.add_argument('--ghn', required=True, help="GHN checkpoint file, official name, or 'default'")
        q.add_argument(
            '--n', type=int, default=n_default, help='reference architectures (default: %(default)s)'
        )
        q.add_argument(
            '--split', default='train', help='DeepNets-1M split of the reference set (default: train)'
        )
        q.add_argument(
            '--cache-dir', default=None, help='reference cache (default: ~/.cache/ghnviz/embeddings)'
        )
        q.add_argument('--batch-size', type=int, default=8, help='architectures per GHN forward')
        q.add_argument('--workers', type=int, default=1, help='processes building graphs in parallel')

    r = cmds.add_parser('reference', help='compute (or find) the reference set of a GHN and save it')
    common(r, DEFAULT_N)
    r.add_argument('--start', type=int, default=0, help='first architecture index of the split')
    r.add_argument('--out', default=None, help='write the set to this folder (default: the cache)')
    r.add_argument('--force', action='store_true', help='recompute even if a stored set exists')
    r.set_defaults(func=_reference)

    s = cmds.add_parser('shift', help="a model's distribution-shift percentile, distances and neighbours")
    common(s, None)
    s.add_argument('--model', required=True, help='torchvision name or deepnets1m:<GENOTYPE|split/index>')
    s.add_argument('--k', type=int, default=10, help='nearest neighbours (default: 10)')
    s.add_argument('--json', default=None, help='also write the full report to this JSON file')
    s.set_defaults(func=_shift)

    q = cmds.add_parser('properties', help='regress architecture properties from embeddings (held-out R^2)')
    common(q, None)
    q.add_argument('--regressor', default='ridge', help='ridge or svr (default: ridge)')
    q.add_argument('--seed', type=int, default=0, help='seed of the train/test split')
    q.add_argument('--json', default=None, help='also write the scores to this JSON file')
    q.set_defaults(func=_properties)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def _progress_bar(desc: str):
    """A progress callback that opens a tqdm bar on its first call (a cache hit shows none)."""
    state = {}

    def update(done: int, total: int) -> None:
        from tqdm.auto import tqdm

        bar = state.get('bar')
        if bar is None:
            bar = state['bar'] = tqdm(total=total, desc=desc, unit='arch', file=sys.stderr)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def _load(args: argparse.Namespace, n: int | None, out: str | None = None, force: bool = False):
    import ghnviz
    from ghnviz.embed import reference_set

    ghn = ghnviz.load_ghn(args.ghn)
    ref = reference_set(
        ghn,
        n=n,
        split=args.split,
        start=getattr(args, 'start', 0),
        cache_dir=args.cache_dir,
        out_dir=out,
        force=force,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=_progress_bar(f'embedding {args.split}'),
    )
    return ghn, ref


def _reference(args: argparse.Namespace) -> int:
    import time

    t0 = time.perf_counter()
    _, ref = _load(args, args.n, args.out, args.force)
    seconds = time.perf_counter() - t0
    m = ref.meta
    hid = ref.embeddings.shape[1]
    print(f'reference set  {ref.key}: {len(ref)} {m["split"]} architectures, {hid}-d embeddings')
    print(f'file           {ref.path}')
    print(f'computed in    {m["seconds"]:.1f} s ({m["seconds"] / max(len(ref), 1):.3f} s per architecture)')
    print(f'this command   {seconds:.1f} s')
    return 0


def _shift(args: argparse.Namespace) -> int:
    from ghnviz.embed import distribution_shift

    ghn, ref = _load(args, args.n)
    report = distribution_shift(ghn, args.model, k=args.k, reference=ref)
    print(f'model        {args.model}')
    print(f'reference    {ref.key} ({len(ref)} architectures)')
    print(f"percentile   {report.percentile:.1f}  (of the reference set's own {report.k}-NN distances)")
    print(f'distance     {report.distance:.3f}  (mean {report.k}-NN, standardised Euclidean)')
    print(f'mahalanobis  {report.mahalanobis:.3f}  (percentile {report.mahalanobis_percentile:.1f})')
    if report.matches:
        print(f'same graph   {", ".join(report.matches)} (left out)')
    print('neighbours')
    for nb in report.neighbours:
        print(f'  {nb.distance:7.3f}  {nb.name:<14} {nb.num_params:>11,} params  {nb.description}')
    print('seconds      ' + ', '.join(f'{k} {v:.3f}' for k, v in report.seconds.items()))
    if args.json:
        Path(args.json).write_text(report.to_json() + '\n')
    return 0


def _properties(args: argparse.Namespace) -> int:
    from ghnviz.embed import FEATURES, TARGETS, predict_property

    _, ref = _load(args, args.n)
    head = f'{"target":<12} {"features":<14} {"R^2":>7} {"tau":>7}'
    print(f'{head}   ({args.regressor}, {len(ref)} architectures, a quarter held out)')
    rows = []
    for target in TARGETS:
        for features in FEATURES:
            fit = predict_property(ref, target, features, args.regressor, seed=args.seed)
            rows.append(fit.to_dict())
            print(f'{target:<12} {features:<14} {fit.r2:7.3f} {fit.kendall_tau:7.3f}')
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + '\n')
    return 0
