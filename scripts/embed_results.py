"""Distribution-shift results of one GHN, written as markdown (the embeddings part of docs/results.md).

Usage:
    python scripts/embed_results.py --ghn default [--n 2000] [--per-split 20] [--out docs/results_embed.md]
    python scripts/embed_results.py --ghn ghn2_cifar10_random.pt --label "random-weights GHN-2 (CIFAR-10)"

Reports, against the GHN's reference set (the first N training architectures, computed and cached
when absent): shift percentiles of a few torchvision models and of the first architectures of the
held-out DeepNets-1M splits (plus training architectures outside the reference set, the
in-distribution control); property regression from embeddings; query and projection timings (wall
and process CPU time: on a busy machine the CPU time is the steadier figure).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
import time
from pathlib import Path

# This folder holds other scripts (one is named coverage.py, which would shadow the `coverage` package
# numba imports for UMAP); import nothing from here.
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import ghnviz  # noqa: E402
from ghnviz.embed import (  # noqa: E402
    FEATURES,
    TARGETS,
    Projection,
    compute_reference,
    distribution_shift,
    ghn_hash,
    predict_property,
    query_model,
    reference_set,
    score_embedding,
)

TORCHVISION = ('resnet50', 'convnext_tiny', 'vit_b_16', 'efficientnet_b0')
SPLITS = ('test', 'wide', 'deep', 'dense', 'bnfree')
TIMED = ('resnet50', 'vit_b_16')


def _clock():
    return time.perf_counter(), time.process_time()


def _since(t):
    return time.perf_counter() - t[0], time.process_time() - t[1]


def torchvision_rows(ghn, ref, k: int) -> list[dict]:
    rows = []
    for name in TORCHVISION:
        r = distribution_shift(ghn, name, k=k, reference=ref)
        nb = r.neighbours[0]
        rows.append(
            dict(
                model=name,
                percentile=r.percentile,
                distance=r.distance,
                mahalanobis=r.mahalanobis,
                mahalanobis_percentile=r.mahalanobis_percentile,
                nearest=f'{nb.name} ({nb.description})',
            )
        )
    return rows


def split_rows(ghn, ref, k: int, per_split: int) -> list[dict]:
    groups = [('train (not in the reference set)', 'train', len(ref))] + [(s, s, 0) for s in SPLITS]
    rows = []
    for label, split, start in groups:
        q = compute_reference(ghn, n=per_split, split=split, start=start, batch_size=10)
        reports = [score_embedding(ref, q.embeddings[i], k, q.table['signature'][i]) for i in range(len(q))]
        pct = np.array([r.percentile for r in reports])
        maha = np.array([r.mahalanobis for r in reports])
        rows.append(
            dict(
                split=label,
                n=len(pct),
                mean=float(pct.mean()),
                std=float(pct.std()),
                median=float(np.median(pct)),
                min=float(pct.min()),
                max=float(pct.max()),
                over_95=float((pct > 95).mean() * 100),
                mahalanobis_mean=float(maha.mean()),
                percentiles=[round(float(p), 1) for p in pct],
                cpu_per_arch=q.meta['cpu_seconds'] / len(q),  # this process's CPU time per architecture
            )
        )
    return rows


def property_rows(ref, seed: int) -> list[dict]:
    rows = []
    for target in TARGETS:
        for features in FEATURES:
            for regressor in ('ridge', 'svr'):
                rows.append(predict_property(ref, target, features, regressor, seed=seed).to_dict())
    return rows


def query_timings(ghn, ref, k: int, repeat: int) -> list[dict]:
    rows = []
    for name in TIMED:
        t = _clock()
        model = query_model(name, ghn)
        build = _since(t)
        runs = []
        for _ in range(repeat):
            fresh = query_model(name, ghn)
            ghn._graphs.clear()  # measure tracing too: the GHN would otherwise reuse the graph it cached
            t = _clock()
            r = distribution_shift(ghn, fresh, k=k, reference=ref)
            runs.append((_since(t), r.seconds))
        del model
        wall = statistics.median(w for (w, _), _ in runs)
        cpu = statistics.median(c for (_, c), _ in runs)
        parts = {p: statistics.median(s[p] for _, s in runs) for p in ('graph', 'embed', 'score')}
        first = runs[0][0][0]
        rows.append(dict(model=name, build_wall=build[0], first=first, wall=wall, cpu=cpu, **parts))
    return rows


def projection_timings(ref) -> list[dict]:
    rows = []
    for method in ('pca', 'umap', 'tsne'):
        t = _clock()
        Projection(method).fit(ref)
        wall, cpu = _since(t)
        rows.append(dict(method=method, wall=wall, cpu=cpu))
    return rows


def _fmt(v: float, d: int = 1) -> str:
    return f'{v:.{d}f}'


def markdown(res: dict) -> str:
    m = res['reference']
    train = res['splits'][0]  # the held-out training architectures
    cpu, n_queries = train['cpu_per_arch'], train['n']
    out = [f'## Graph embeddings and distribution shift ({res["label"]})', '']
    if res['random']:
        out += [
            '> **Random-weights GHN.** These numbers come from a GHN that was never trained (the GHN-2 '
            'conformance file with random weights). Its embeddings still encode primitive types and tensor '
            'shapes, so they show what the method does, not what a trained GHN sees.',
            '',
        ]
    out += [
        f'GHN: `{res["ghn"]}` ({m["ghn_arch"]}, sha256 `{m["ghn_hash"][:16]}`, {m["num_classes"]} classes, '
        f'{"224x224" if m["is_imagenet_input"] else "32x32"} inputs, {res["hid"]}-d embeddings). '
        f'Reference set: the first {m["n"]:,} `{m["split"]}` architectures of the DeepNets-1M space, '
        f'embedded in {m["seconds"]:.0f} s wall ({m["seconds"] / m["n"]:.2f} s per architecture'
        + (f', {m["cpu_seconds"]:.0f} s CPU' if 'cpu_seconds' in m else '')
        + f', {m.get("workers", 1)} process, on a shared 2-core machine). On an idle core it is about '
        f'{cpu:.2f} s CPU per architecture (process CPU time over the {n_queries} held-out training '
        f'architectures below: model construction, graph tracing, GHN forward), i.e. about '
        f'{cpu * m["n"] / 60:.0f} min for {m["n"]:,}.',
        '',
        f"Scores (k = {res['k']}): *percentile* ranks the model's mean {res['k']}-NN distance (Euclidean, "
        "embeddings standardised by the reference mean and std) among the reference architectures' own "
        'leave-one-out distances; an in-distribution model lands anywhere in 0-100 (median about 50), values '
        'near 100 mean the model is farther from the training architectures than nearly all of them are from '
        'each other. *Mahalanobis* uses a Ledoit-Wolf covariance of the standardised reference embeddings.',
        '',
        '### Torchvision models',
        '',
        '| model | percentile | k-NN distance | Mahalanobis (percentile) | nearest training architecture |',
        '|---|---:|---:|---:|---|',
    ]
    for r in res['torchvision']:
        out.append(
            f'| {r["model"]} | {_fmt(r["percentile"])} | {_fmt(r["distance"], 2)} | '
            f'{_fmt(r["mahalanobis"], 2)} ({_fmt(r["mahalanobis_percentile"])}) | {r["nearest"]} |'
        )
    out += [
        '',
        f'### DeepNets-1M splits (first {res["per_split"]} architectures of each)',
        '',
        '| split | n | percentile mean ± std | median | min - max | % above 95 | mean Mahalanobis |',
        '|---|---:|---:|---:|---:|---:|---:|',
    ]
    for r in res['splits']:
        out.append(
            f'| {r["split"]} | {r["n"]} | {_fmt(r["mean"])} ± {_fmt(r["std"])} | {_fmt(r["median"])} | '
            f'{_fmt(r["min"])} - {_fmt(r["max"])} | {_fmt(r["over_95"], 0)} | '
            f'{_fmt(r["mahalanobis_mean"], 2)} |'
        )
    out += [
        '',
        '### Property prediction from embeddings',
        '',
        'A regressor trained on three quarters of the reference set, scored on the held-out quarter '
        '(R^2, Kendall tau). `op_fractions` (the share of graph nodes of each primitive type) is a baseline '
        'that needs no GHN.',
        '',
        '| target | features | ridge R^2 | ridge tau | SVR R^2 | SVR tau |',
        '|---|---|---:|---:|---:|---:|',
    ]
    props = {(p['target'], p['features'], p['regressor']): p for p in res['properties']}
    for target in TARGETS:
        for features in FEATURES:
            a, b = props[(target, features, 'ridge')], props[(target, features, 'svr')]
            out.append(
                f'| {target} | {features} | {_fmt(a["r2"], 3)} | {_fmt(a["kendall_tau"], 3)} | '
                f'{_fmt(b["r2"], 3)} | {_fmt(b["kendall_tau"], 3)} |'
            )
    out += [
        '',
        '### Timings',
        '',
        'One query with the reference set in memory (`distribution_shift` on a freshly built model: graph '
        f'building, GHN forward, scoring; median of {res["repeat"]}); the first query of a process also '
        'imports scikit-learn and fits the Ledoit-Wolf covariance. Building the model is listed apart.',
        '',
        '| model | first query s | query wall s | query CPU s | graph s | embed s | score s | build s |',
        '|---|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for r in res['timings']:
        out.append(
            f'| {r["model"]} | {_fmt(r["first"], 3)} | {_fmt(r["wall"], 3)} | {_fmt(r["cpu"], 3)} | '
            f'{_fmt(r["graph"], 3)} | '
            f'{_fmt(r["embed"], 3)} | {_fmt(r["score"], 4)} | {_fmt(r["build_wall"], 2)} |'
        )
    if res.get('projections'):
        out += ['', f'Fitting a projection on the {m["n"]:,} reference embeddings (imports included):', '']
        out += ['| method | wall s | CPU s |', '|---|---:|---:|']
        out += [f'| {r["method"]} | {_fmt(r["wall"])} | {_fmt(r["cpu"])} |' for r in res['projections']]
    out += ['', f'Produced by `python scripts/embed_results.py {res["argv"]}`.', '']
    return '\n'.join(out)


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument('--ghn', default='default', help="GHN file or name (default: 'default')")
    parser.add_argument('--label', default=None, help='how to name the GHN in the heading')
    parser.add_argument('--random', action='store_true', help='mark the results as from a random-weights GHN')
    parser.add_argument('--n', type=int, default=2000, help='reference architectures')
    parser.add_argument('--k', type=int, default=10, help='neighbours')
    parser.add_argument('--per-split', type=int, default=20, help='architectures per held-out split')
    parser.add_argument('--repeat', type=int, default=3, help='timed queries per model')
    parser.add_argument('--seed', type=int, default=0, help='seed of the property-regression split')
    parser.add_argument('--cache-dir', default=None, help='reference cache folder')
    parser.add_argument('--workers', type=int, default=1, help='processes if the reference set is computed')
    parser.add_argument('--no-projections', action='store_true', help='skip the projection timings')
    parser.add_argument('--out', default='docs/results_embed.md', help='markdown file to write')
    parser.add_argument('--json', default=None, help='also write the raw numbers here')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    torch.set_num_threads(1)

    ghn = ghnviz.load_ghn(args.ghn)
    ref = reference_set(ghn, n=args.n, cache_dir=args.cache_dir, workers=args.workers)
    logging.info('reference set %s (%d architectures)', ref.key, len(ref))
    res = dict(
        ghn=args.ghn if args.ghn == 'default' else Path(args.ghn).name,
        label=args.label or args.ghn,
        random=args.random,
        hid=int(ref.embeddings.shape[1]),
        k=args.k,
        per_split=args.per_split,
        repeat=args.repeat,
        reference=ref.meta,
        argv=shlex.join(sys.argv[1:] if argv is None else argv),
    )
    assert res['reference']['ghn_hash'] == ghn_hash(ghn)
    res['timings'] = query_timings(ghn, ref, args.k, args.repeat)  # first: includes first-use imports
    res['torchvision'] = torchvision_rows(ghn, ref, args.k)
    res['splits'] = split_rows(ghn, ref, args.k, args.per_split)
    res['properties'] = property_rows(ref, args.seed)
    res['projections'] = [] if args.no_projections else projection_timings(ref)
    text = markdown(res)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=float) + '\n')
    print(text)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
