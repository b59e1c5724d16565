"""Which parameters a GHN predicts, fills or skips, for every torchvision (or timm) classifier.

For each model: build it (random init, seed 0, 1000 classes), build its graph, then
``ghn.predict(model, graph=graph, complete=True)`` and count the tensors and scalar parameters that
were predicted by the GHN, filled by a rule (:mod:`ghnviz.hyper.extras`) or skipped. Models run in
worker processes (one model at a time each) with a per-model time limit; a model over the time limit
or over ``--max-params`` is reported, not run.

    python scripts/model_coverage.py                      # torchvision, writes docs/coverage.md
    python scripts/model_coverage.py --source timm --max-params 100e6 --timeout 120 --workers 1 \\
        --json /tmp/timm.json                       # timm, writes docs/coverage_timm.md
    python scripts/model_coverage.py resnet18 swin_t --out -   # some models, table on stdout only

Rewriting the Markdown from saved results: ``--from-json FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GHN = ROOT.parent / 'shared' / 'conformance' / 'ghn3_tiny_random.joblib'
DEFAULT_OUT = {'torchvision': ROOT / 'docs' / 'coverage.md', 'timm': ROOT / 'docs' / 'coverage_timm.md'}


# ---- worker side --------------------------------------------------------------------------------------


def _create(source: str, name: str, device: str):
    import torch

    if source == 'torchvision':
        import ghnviz

        return ghnviz.create_model(name, num_classes=1000)
    import timm

    with torch.device(device):
        model = timm.create_model(name, pretrained=False, num_classes=1000)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if cfg.get('input_size'):
        model.expected_input_sz = tuple(cfg['input_size'])  # the input the model is defined for
    return model


def _count_params(source: str, name: str) -> int:
    """Parameter count from a model built on the meta device (no memory, no init)."""
    import torch

    if source == 'torchvision':
        import torchvision

        with torch.device('meta'):
            model = torchvision.models.get_model(name, weights=None, num_classes=1000)
    else:
        model = _create(source, name, 'meta')
    return sum(p.numel() for p in model.parameters())


def _run_one(ghn, source: str, name: str, max_params: float) -> dict:
    import torch

    import ghnviz

    rec: dict = {'name': name, 'status': 'ok'}
    stage = 'count'
    try:
        n = None
        if max_params < float('inf'):
            try:
                n = _count_params(source, name)
            except Exception:  # noqa: BLE001 - some models cannot be built on the meta device
                pass
        if n is not None and n > max_params:
            rec.update(status='too_large', params_total=n)
            return rec
        stage = 'create'
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = _create(source, name, 'cpu')  # in its default (training) mode, as the GHN papers trace it
        t1 = time.perf_counter()
        n = sum(p.numel() for p in model.parameters())
        if n > max_params:
            rec.update(status='too_large', params_total=n)
            return rec
        stage = 'graph'
        graph = ghnviz.build_graph(model, ve_cutoff=ghn.config.ve_cutoff)
        t2 = time.perf_counter()
        stage = 'predict'
        pred = ghn.predict(model, graph=graph, complete=True)
    except Exception as e:  # noqa: BLE001 - every failure is a result here
        rec.update(status='error', stage=stage, error=f'{type(e).__name__}: {e}'.splitlines()[0][:300])
        return rec
    finally:
        ghn._init_caches()  # one model at a time: keep no graphs alive
    rec.update(pred.counts())
    if pred.skipped:  # would the opt-in last resort (the owning modules' own init) fill the rest?
        from ghnviz.hyper.extras import FillConfig, fill_missing

        extra = fill_missing(model, list(pred.skipped), FillConfig(module_init=True))
        rec['module_init_fills'] = len(extra)
    rec.update(
        n_nodes=graph.n_nodes,
        input_size=list(graph.meta.get('input_size', ())),
        skipped=pred.skipped,
        filled=dict(Counter(v.split(':')[0] for v in pred.filled.values())),
        seconds={
            'create': t1 - t0,
            'graph': t2 - t1,
            'predict': pred.seconds['predict'],
            'fill': pred.seconds['fill'],
            'total': (t2 - t1) + pred.seconds['predict'] + pred.seconds['fill'],
        },
    )
    return rec


def worker(args: argparse.Namespace) -> None:
    """Read model names from stdin, write one JSON result per line to stdout."""
    import logging
    import warnings

    import torch

    import ghnviz

    warnings.filterwarnings('ignore')
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    ghn = ghnviz.load_ghn(args.ghn)
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints of model code must not corrupt the protocol
    for line in sys.stdin:
        name = line.strip()
        if name:
            out.write(json.dumps(_run_one(ghn, args.source, name, args.max_params)) + '\n')
            out.flush()


# ---- parent side --------------------------------------------------------------------------------------


class _Worker:
    def __init__(self, args: argparse.Namespace):
        cmd = [sys.executable, __file__, '--worker', '--source', args.source, '--ghn', str(args.ghn)]
        cmd += ['--threads', str(args.threads), '--max-params', str(args.max_params)]
        env = {**os.environ, 'OMP_NUM_THREADS': str(args.threads), 'PYTHONPATH': str(ROOT)}
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
        self.name: str | None = None
        self.deadline = 0.0

    def send(self, name: str, timeout: float) -> None:
        self.name, self.deadline = name, time.monotonic() + timeout
        self.proc.stdin.write(name + '\n')
        self.proc.stdin.flush()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def run_all(names: list[str], args: argparse.Namespace) -> list[dict]:
    """Run every model in a pool of ``args.workers`` processes with a per-model time limit.

    With ``--json FILE``, each result is also appended to ``FILE.partial.jsonl`` as it comes; a rerun
    with ``--resume`` takes the models found there as done.
    """
    results: dict[str, dict] = {}
    log_path = args.json.with_suffix('.partial.jsonl') if args.json else None
    if log_path and args.resume and log_path.exists():
        for line in log_path.read_text().splitlines():
            rec = json.loads(line)
            if rec['name'] in names:
                results[rec['name']] = rec
        print(f'resuming: {len(results)} models done', file=sys.stderr)
    elif log_path:
        log_path.write_text('')
    pending = [n for n in reversed(names) if n not in results]
    sel = selectors.DefaultSelector()
    workers: list[_Worker] = []

    def spawn() -> _Worker:
        w = _Worker(args)
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        workers.append(w)
        return w

    def replace(w: _Worker) -> None:
        sel.unregister(w.proc.stdout)
        w.stop()
        workers.remove(w)
        spawn()

    def done(rec: dict) -> None:
        results[rec['name']] = rec
        if log_path:
            with open(log_path, 'a') as f:
                f.write(json.dumps(rec) + '\n')
        print(_progress_line(rec, len(results), len(names)), file=sys.stderr, flush=True)

    for _ in range(min(args.workers, len(pending))):
        spawn()
    while pending or any(w.name for w in workers):
        for w in workers:
            if w.name is None and pending:
                w.send(pending.pop(), args.timeout)
        busy = [w for w in workers if w.name]
        wait = max(0.0, min(w.deadline for w in busy) - time.monotonic())
        for key, _ in sel.select(timeout=wait):
            w = key.data
            line = w.proc.stdout.readline()
            if line:
                done(json.loads(line))
                w.name = None
            else:  # the worker died (out of memory, segfault)
                done({'name': w.name, 'status': 'crashed', 'error': f'worker exit code {w.proc.wait()}'})
                replace(w)
        now = time.monotonic()
        for w in list(workers):
            if w.name and now > w.deadline:
                done({'name': w.name, 'status': 'timeout', 'error': f'over {args.timeout:g} s'})
                replace(w)
    for w in workers:
        w.proc.stdin.close()
        w.stop()
    return [results[n] for n in names]


def _progress_line(rec: dict, k: int, n: int) -> str:
    if rec['status'] != 'ok':
        return f'[{k}/{n}] {rec["name"]}: {rec["status"]} {rec.get("error", "")}'
    return (
        f'[{k}/{n}] {rec["name"]}: {rec["tensors_predicted"]}+{rec["tensors_filled"]}/{rec["tensors_total"]} '
        f'tensors, {rec["seconds"]["total"]:.1f} s'
    )


# ---- report ---------------------------------------------------------------------------------------------


def _fmt_params(n: int) -> str:
    return f'{n / 1e6:.2f}M' if n >= 1e5 else str(n)


def _fmt_skipped(skipped: dict[str, str], limit: int = 3) -> str:
    if not skipped:
        return ''
    names = list(skipped)
    text = ', '.join(f'`{n}`' for n in names[:limit])
    return text + (f' (+{len(names) - limit} more)' if len(names) > limit else '')


def _reason_kind(reason: str) -> str:
    """``'no graph node for LSTM.weight_ih_l0: ...'`` -> ``'LSTM'``."""
    head = reason.split(':')[0]
    return head.replace('no graph node for ', '').split('.')[0].split(' ')[0]


def summarise(results: list[dict]) -> dict:
    ok = [r for r in results if r['status'] == 'ok']
    return {
        'models': len(results),
        'ran': len(ok),
        'ghn_only': sum(1 for r in ok if not r['skipped'] and not r['tensors_filled']),
        'complete': sum(1 for r in ok if not r['skipped']),
        'complete_module_init': sum(1 for r in ok if len(r['skipped']) == r.get('module_init_fills', 0)),
        'incomplete': [r['name'] for r in ok if r['skipped']],
        'status': dict(Counter(r['status'] for r in results)),
        'filled_rules': dict(sum((Counter(r['filled']) for r in ok), Counter())),
        'seconds': sum(r['seconds']['total'] for r in ok),
    }


def markdown(results: list[dict], meta: dict) -> str:
    s = summarise(results)
    status = s['status'].items()
    lines = [
        f'# Parameter coverage: {meta["source"]} classifiers',
        '',
        f'Generated by `{meta["command"]}` ({meta["versions"]}; GHN file `{meta["ghn"]}`; '
        f'{meta["threads"]} thread(s), 1000 classes, random init with seed 0).',
        '',
        '*predicted*: written by the GHN (the set the original GHN code predicts); *filled*: a tensor the '
        'graph has no node for, given a value by a rule of `ghnviz.hyper.extras` (`predict(complete=True)`); '
        '*skipped*: neither. Seconds: graph + GHN prediction + fill (model construction excluded).',
        '',
        f'- models: {s["models"]}, run: {s["ran"]} ({", ".join(f"{k}: {v}" for k, v in status)})',
        f'- every tensor predicted by the GHN: {_share(s["ghn_only"], s["ran"])}',
        f'- every tensor predicted or filled (`complete=True`): **{_share(s["complete"], s["ran"])}**',
        f"- ... also counting `FillConfig(module_init=True)` (the remaining layers' own init): "
        f'{_share(s["complete_module_init"], s["ran"])}',
        f'- fill rules used (tensors): {", ".join(f"{k} {v}" for k, v in sorted(s["filled_rules"].items()))}',
        f'- total seconds (graph + predict + fill): {s["seconds"]:.0f}{_run_time(meta)}',
        '',
    ]
    if meta.get('notes'):
        lines += [meta['notes'], '']
    lines += _rules_section()
    if meta['source'] == 'timm':
        lines += _timm_sections(results)
    else:
        lines += _table(results)
    return '\n'.join(lines) + '\n'


def _share(k: int, n: int) -> str:
    return f'{k} of {n} ({100 * k / max(n, 1):.1f}%)'


def _run_time(meta: dict) -> str:
    parts = []
    if 'wall_seconds' in meta:
        parts.append(f'{meta["wall_seconds"] / 60:.0f} min wall')
    if 'worker_cpu_seconds' in meta:
        parts.append(f'{meta["worker_cpu_seconds"] / 60:.0f} min CPU in the workers')
    return f'; whole run (model construction included): {", ".join(parts)}' if parts else ''


def _rules_section() -> list[str]:
    from ghnviz.hyper.extras import FILL_RULES, FillConfig

    cfg = FillConfig()
    lines = [
        '## Fill rules',
        '',
        '`ghn.predict(model)` (the library default, `complete=False`) predicts exactly the tensors '
        'the original GHN code predicts and lists every other tensor in `Prediction.skipped`. '
        '`ghn.predict(model, complete=True)` also gives each tensor without a graph node a value by '
        'the first matching rule below (settings: `FillConfig`), listed in `Prediction.filled` '
        '(name -> rule), never in `predicted`; what no rule matches stays in `skipped`. Random fills '
        f'use their own generator (seed {cfg.seed}), not the global one.',
        '',
        '| rule | value |',
        '|---|---|',
    ]
    lines += [f'| `{r.name}` | {r.describe(cfg)} |' for r in FILL_RULES]
    lines += [
        "| `module_init` (opt-in: `FillConfig(module_init=True)`) | the owning module's `reset_parameters()` "
        '(seeded) for tensors of layer types a GHN cannot represent (`nn.LSTM`, `nn.Conv1d`, ...) |',
        '',
    ]
    return lines


def _table(results: list[dict]) -> list[str]:
    lines = [
        '| model | nodes | tensors predicted / filled / total | params predicted / total | filled by | '
        'skipped | seconds |',
        '|---|---:|---|---|---|---|---:|',
    ]
    for r in results:
        if r['status'] != 'ok':
            lines.append(f'| {r["name"]} | | {r["status"]}: {r.get("error", "")} | | | | |')
            continue
        filled = ', '.join(f'{k} ({v})' for k, v in r['filled'].items())
        lines.append(
            f'| {r["name"]} | {r["n_nodes"]} | {r["tensors_predicted"]} / {r["tensors_filled"]} / '
            f'{r["tensors_total"]} | {_fmt_params(r["params_predicted"])} / '
            f'{_fmt_params(r["params_total"])} | '
            f'{filled} | {_fmt_skipped(r["skipped"])} | {r["seconds"]["total"]:.2f} |'
        )
    return lines


def _timm_sections(results: list[dict]) -> list[str]:
    ok = [r for r in results if r['status'] == 'ok']
    lines = ['## Not run', '']
    for status in ('too_large', 'timeout', 'crashed', 'error'):
        group = [r for r in results if r['status'] == status]
        if not group:
            continue
        lines.append(f'### {status} ({len(group)})')
        lines.append('')
        if status == 'too_large':
            lines.append(', '.join(f'{r["name"]} ({_fmt_params(r["params_total"])})' for r in group))
        else:
            for r in group:
                stage = f' ({r["stage"]})' if r.get('stage') else ''
                lines.append(f'- {r["name"]}{stage}: {r.get("error", "")}')
        lines.append('')
    incomplete = [r for r in ok if r['skipped']]
    kinds = Counter(_reason_kind(v) for r in incomplete for v in r['skipped'].values())
    kind_models = Counter(k for r in incomplete for k in {_reason_kind(v) for v in r['skipped'].values()})
    lines += [
        f'## Run but not complete ({len(incomplete)})',
        '',
        'Skipped tensors by owning layer type: '
        + ', '.join(f'{k} ({kind_models[k]} models, {v} tensors)' for k, v in kinds.most_common()),
        '',
        '| model | tensors predicted / filled / total | skipped |',
        '|---|---|---|',
    ]
    for r in incomplete:
        kinds_r = Counter(_reason_kind(v) for v in r['skipped'].values())
        lines.append(
            f'| {r["name"]} | {r["tensors_predicted"]} / {r["tensors_filled"]} / {r["tensors_total"]} | '
            + ', '.join(f'{k} ({v})' for k, v in kinds_r.items())
            + f': {_fmt_skipped(r["skipped"], 2)} |'
        )
    return lines + ['']


def _names(args: argparse.Namespace) -> list[str]:
    if args.models:
        return args.models
    if args.source == 'torchvision':
        import torchvision

        return list(torchvision.models.list_models(module=torchvision.models))
    import timm

    return list(timm.list_models())


def _versions(source: str) -> str:
    import torch
    import torchvision

    text = f'torch {torch.__version__}, torchvision {torchvision.__version__}'
    if source == 'timm':
        import timm

        text += f', timm {timm.__version__}'
    return text


def _children_cpu() -> float:
    import resource

    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def _shown_args(argv: list[str]) -> list[str]:
    """The command line without output paths (they are local)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ('--json', '--out'):
            skip = True
        elif a != '--resume' and not a.startswith(('--json=', '--out=')):
            out.append(a)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('models', nargs='*', help='model names (default: every model of --source)')
    p.add_argument('--source', choices=('torchvision', 'timm'), default='torchvision')
    p.add_argument('--ghn', type=Path, default=DEFAULT_GHN, help='GHN checkpoint')
    p.add_argument('--out', help='Markdown file ("-": stdout only); default docs/coverage[_timm].md')
    p.add_argument('--json', type=Path, help='also save the per-model results here')
    p.add_argument('--from-json', type=Path, help='write the Markdown from saved results, run nothing')
    p.add_argument('--resume', action='store_true', help='skip models already in the --json partial log')
    p.add_argument('--workers', type=int, default=1, help='worker processes')
    p.add_argument('--threads', type=int, default=1, help='torch threads per worker')
    p.add_argument('--timeout', type=float, default=300.0, help='seconds per model')
    p.add_argument('--max-params', type=float, default=float('inf'), help='skip larger models')
    p.add_argument('--notes', default='', help='a paragraph added to the Markdown')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        results, meta = saved['results'], saved['meta']
        meta['notes'] = args.notes or meta.get('notes', '')
    else:
        names = _names(args)
        command = 'python scripts/model_coverage.py ' + ' '.join(_shown_args(sys.argv[1:]))
        meta = dict(
            source=args.source,
            ghn=args.ghn.name,
            threads=args.threads,
            command=command.strip(),
            versions=_versions(args.source),
            notes=args.notes,
        )
        t = time.perf_counter()
        results = run_all(names, args)
        meta['wall_seconds'] = time.perf_counter() - t
        meta['worker_cpu_seconds'] = _children_cpu()
        if args.json:
            args.json.write_text(json.dumps({'meta': meta, 'results': results}, indent=1))
    text = markdown(results, meta)
    out = args.out or (None if args.models else str(DEFAULT_OUT[meta['source']]))
    if out and out != '-':
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f'wrote {out}', file=sys.stderr)
    print(text)


if __name__ == '__main__':
    main()
