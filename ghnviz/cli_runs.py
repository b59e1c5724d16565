"""Sub-commands `finetune` and `runs` (list, show, export, cancel, execute).

``python -m ghnviz.cli_runs ...`` works on its own too: the background runner starts
``python -m ghnviz.cli_runs runs execute --db DB --id ID``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields

# FinetuneConfig field -> (flag, type, help); the defaults come from FinetuneConfig itself
_FINETUNE_FLAGS: dict[str, tuple[str, type, str]] = {
    'model': ('--model', str, 'ghnviz zoo / torchvision model name (with --model-file: a class name)'),
    'num_classes': ('--num-classes', int, "classes of the model (default: the dataset's)"),
    'init': ('--init', str, 'initialisation: default, ghn, ghn+orth, ghn+orth+noise'),
    'ghn': ('--ghn', str, 'GHN file or name for the ghn* inits'),
    'beta': ('--beta', float, 'noise scale for post-processing (default: 3e-5 for +noise)'),
    'layer': ('--layer', int, 'first post-processed layer (default: model preset or 0)'),
    'dataset': ('--dataset', str, 'dataset name'),
    'data_path': ('--data-path', str, "dataset archive or folder (default: the dataset's default place)"),
    'shots': ('--shots', int, 'training images per class (0: all)'),
    'steps': ('--steps', int, 'optimiser steps'),
    'epochs': ('--epochs', float, 'passes over the training subset (overrides --steps)'),
    'lr': ('--lr', float, 'peak learning rate (cosine schedule with warm-up)'),
    'wd': ('--wd', float, 'weight decay'),
    'opt': ('--opt', str, 'optimizer: sgd, adamw, adam'),
    'batch_size': ('--batch-size', int, 'training batch size'),
    'image_size': ('--image-size', int, 'input size (<= 32: the model is adapted to small images)'),
    'label_smoothing': ('--label-smoothing', float, 'cross-entropy label smoothing'),
    'eval_every': ('--eval-every', int, 'steps between test evaluations (0: start and end only)'),
    'eval_limit': ('--eval-limit', int, 'test images evaluated (class-balanced subset; 0: all)'),
    'bn_recalibrate': ('--bn-recalibrate', int, 'batches to re-estimate BN statistics before evaluating'),
    'seed': ('--seed', int, 'random seed'),
    'device': ('--device', str, "'auto', 'cpu' or 'cuda'"),
    'threads': ('--threads', int, "torch CPU threads (default: torch's)"),
}


def _add_db(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        '--db', default=None, help='run store file (default: $GHNVIZ_HOME/runs.sqlite or ~/.local/share)'
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the ``finetune`` and ``runs`` sub-commands on ``sub``."""
    from ghnviz.finetune import INITS, OPTIMIZERS, FinetuneConfig

    f = sub.add_parser(
        'finetune', help='fine-tune a model from its default, GHN-predicted or post-processed init'
    )
    defaults = {fl.name: fl.default for fl in fields(FinetuneConfig)}
    choices = {'init': list(INITS), 'opt': list(OPTIMIZERS)}
    for name, (flag, typ, text) in _FINETUNE_FLAGS.items():
        default = defaults[name]
        shown = '' if default is None else f' [{default}]'
        f.add_argument(
            flag, dest=name, type=typ, default=default, choices=choices.get(name), help=text + shown
        )
    f.add_argument(
        '--model-file',
        default=None,
        help='Python file defining the model class named by --model (runs that code; not adapted)',
    )
    f.add_argument('--no-augment', dest='augment', action='store_false', help='no crop/flip augmentation')
    f.add_argument('--name', default=None, help='run name')
    _add_db(f)
    f.add_argument('--no-db', action='store_true', help='do not record the run (foreground only)')
    f.add_argument('--background', action='store_true', help='run in a detached process; print the run id')
    f.set_defaults(func=_finetune)

    r = sub.add_parser('runs', help='list, show, export, cancel stored runs')
    rsub = r.add_subparsers(dest='runs_command', metavar='ACTION', required=True)
    p = rsub.add_parser('list', help='one line per run')
    p.add_argument('--status', default=None, choices=('queued', 'running', 'done', 'failed', 'cancelled'))
    _add_db(p)
    p.set_defaults(func=_list)
    p = rsub.add_parser('show', help='a run: config, status, final metrics, events')
    p.add_argument('id', type=int)
    _add_db(p)
    p.set_defaults(func=_show)
    p = rsub.add_parser('export', help='metrics of runs as long-format CSV')
    p.add_argument('--csv', required=True, help="output file ('-' for standard output)")
    p.add_argument('ids', type=int, nargs='*', help='run ids (default: all)')
    _add_db(p)
    p.set_defaults(func=_export)
    p = rsub.add_parser('cancel', help='stop a run (cancel flag, then SIGTERM, then SIGKILL)')
    p.add_argument('id', type=int)
    p.add_argument('--grace', type=float, default=5.0, help='seconds to wait before SIGTERM')
    _add_db(p)
    p.set_defaults(func=_cancel)
    p = rsub.add_parser('wait', help='block until a run ends; exit code 0 when it is done')
    p.add_argument('id', type=int)
    p.add_argument('--timeout', type=float, default=None)
    _add_db(p)
    p.set_defaults(func=_wait)
    p = rsub.add_parser('execute', help='execute a stored run in this process (used by the runner)')
    p.add_argument('--id', type=int, required=True)
    _add_db(p)
    p.set_defaults(func=_execute)


def _store(args: argparse.Namespace):
    from ghnviz.runs import RunStore

    return RunStore(args.db)


def _finetune(args: argparse.Namespace) -> int:
    from ghnviz.finetune import FinetuneConfig, finetune

    values = {name: getattr(args, name) for name in _FINETUNE_FLAGS}
    for name in ('shots', 'eval_limit'):  # 0 means "all" on the command line
        if values[name] == 0:
            values[name] = None
    if args.model_file:
        from pathlib import Path

        try:
            values['model_code'] = Path(args.model_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            print(f'error: cannot read --model-file {args.model_file}: {e}', file=sys.stderr)
            return 2
    config = FinetuneConfig(**values, augment=args.augment)
    if args.background:
        from ghnviz.runner import launch

        with _store(args) as store:
            run_id = launch(store, config.to_dict(), name=args.name)
            print(run_id)
        return 0
    try:
        if args.no_db:
            result = finetune(config)
        else:
            with _store(args) as store:
                run_id = store.create_run(config.to_dict(), name=args.name, status='running')
                print(f'run {run_id} in {store.path}', file=sys.stderr)
                result = finetune(config, store=store, run_id=run_id)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
    print(json.dumps({'status': result.status, 'steps': result.steps, **result.metrics}, indent=1))
    return 0 if result.status == 'done' else 1


def _fmt_time(t: float | None) -> str:
    return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t)) if t else '-'


def _fmt(value) -> str:
    return '-' if value is None else f'{value:.4g}' if isinstance(value, float) else str(value)


def _list(args: argparse.Namespace) -> int:
    from ghnviz.runner import reconcile

    with _store(args) as store:
        reconcile(store)
        rows = [
            ('id', 'status', 'name', 'created', 'kind', 'model', 'init', 'step', 'train/loss', 'test/acc')
        ]
        for run in store.list_runs(args.status):
            last = store.latest_metrics(run.id)
            step = max((s for s, _ in last.values()), default=None)
            rows.append(
                (
                    str(run.id),
                    run.status,
                    run.name,
                    _fmt_time(run.created),
                    str(run.config.get('kind', '-')),
                    str(run.config.get('model', '-')),
                    str(run.config.get('init', '-')),
                    _fmt(step),
                    _fmt(last.get('train/loss', (None, None))[1]),
                    _fmt(last.get('test/acc', (None, None))[1]),
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print('  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _show(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ghnviz.runner import log_path, reconcile

    with _store(args) as store:
        reconcile(store)
        run = store.get_run(args.id)
        out = asdict(run)
        for key in ('created', 'launched', 'started', 'finished'):
            out[key] = _fmt_time(out[key])
        out['latest_metrics'] = {
            k: {'step': s, 'value': v} for k, (s, v) in store.latest_metrics(run.id).items()
        }
        out['events'] = [{**e, 'time': _fmt_time(e['time'])} for e in store.events(run.id)]
        out['log'] = str(log_path(store.path, run.id))
    print(json.dumps(out, indent=1, default=str))
    return 0


def _export(args: argparse.Namespace) -> int:
    with _store(args) as store:
        ids = args.ids or None
        if args.csv == '-':
            import tempfile
            from pathlib import Path

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / 'runs.csv'
                store.export_csv(ids, path)
                sys.stdout.write(path.read_text())
        else:
            n = store.export_csv(ids, args.csv)
            print(f'{n} rows written to {args.csv}', file=sys.stderr)
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from ghnviz.runner import cancel

    with _store(args) as store:
        status = cancel(store, args.id, grace_s=args.grace)
    print(f'run {args.id}: {status}')
    return 0


def _wait(args: argparse.Namespace) -> int:
    from ghnviz.runner import wait

    with _store(args) as store:
        status = wait(store, args.id, timeout=args.timeout)
    print(f'run {args.id}: {status}')
    return 0 if status == 'done' else 1


def _execute(args: argparse.Namespace) -> int:
    import logging

    from ghnviz.runner import execute
    from ghnviz.runs import default_db_path

    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    return execute(args.db or default_db_path(), args.id)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` with only these sub-commands and run the chosen one (for the runner and tests)."""
    parser = argparse.ArgumentParser(prog='ghnviz')
    add_parsers(parser.add_subparsers(dest='command', metavar='COMMAND', required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == '__main__':
    raise SystemExit(main())
