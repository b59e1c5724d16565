"""Sub-commands `predict` and `graph`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser('predict', help="predict a model's parameters with a GHN and save them")
    p.add_argument('--ghn', required=True, help="GHN checkpoint file, official name, or 'default'")
    p.add_argument('--model', required=True, help='torchvision name or deepnets1m:<GENOTYPE|split/index>')
    p.add_argument('--num-classes', type=int, default=None, help="classes of the model (default: the GHN's)")
    p.add_argument('--out', default=None, help='write the predicted parameters to this .safetensors file')
    p.add_argument('--no-class-layers', action='store_true', help='keep the default init of the classifier')
    p.add_argument('--device', default=None, help="'cpu' or 'cuda' (default: cuda when available)")
    p.add_argument(
        '--reference-only',
        action='store_true',
        help='set only what the reference GHN code predicts; by default tensors it leaves out '
        '(layer scales, position tables, tokens) are filled by labelled rules (see ghnviz.hyper.extras)',
    )
    p.set_defaults(func=_predict)

    g = sub.add_parser('graph', help="print a model's computation graph as JSON or Graphviz dot")
    g.add_argument('--model', required=True, help='torchvision name or deepnets1m:<GENOTYPE|split/index>')
    g.add_argument('--num-classes', type=int, default=1000)
    g.add_argument('--format', choices=('json', 'dot'), default='json')
    g.add_argument('--ve-cutoff', type=int, default=50, help='longest virtual edge kept (1 = none)')
    g.add_argument('--out', default=None, help='write to this file instead of standard output')
    g.set_defaults(func=_graph)


def _ghn_classes(ghn) -> int | None:
    config = getattr(ghn, 'config', None)
    return getattr(config, 'num_classes', None)


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


def _predict(args: argparse.Namespace) -> int:
    import ghnviz

    ghn = ghnviz.load_ghn(args.ghn, device=args.device)
    num_classes = args.num_classes or _ghn_classes(ghn) or 1000
    model = ghnviz.create_model(args.model, num_classes=num_classes)
    pred = ghn.predict(model, predict_class_layers=not args.no_class_layers, complete=not args.reference_only)
    n_total = sum(p.numel() for p in model.parameters())
    named = dict(model.named_parameters())
    n_pred = sum(named[n].numel() for n in pred.predicted if n in named)
    rows = [
        ('model', f'{args.model} ({num_classes} classes)'),
        ('ghn', str(args.ghn)),
        ('predicted', f'{len(pred.predicted)} tensors, {n_pred:,} of {n_total:,} parameters'),
        ('filled', f'{len(pred.filled)} tensors (rule-based, not predicted by the GHN)'),
        ('skipped', f'{len(pred.skipped)} tensors'),
    ]
    rows += [(f'  {name}', rule) for name, rule in pred.filled.items()]
    rows += [(f'  {name}', reason) for name, reason in pred.skipped.items()]
    rows += [(f'seconds ({k})', f'{v:.4f}') for k, v in pred.seconds.items()]
    if args.out:
        from safetensors.torch import save_file

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.state_dict().items()}
        save_file(tensors, str(out), metadata={'model': args.model, 'ghn': str(args.ghn)})
        rows.append(('saved', str(out)))
    print(format_table(rows))
    return 0


def _graph(args: argparse.Namespace) -> int:
    import ghnviz

    model = ghnviz.create_model(args.model, num_classes=args.num_classes)
    graph = ghnviz.build_graph(model, ve_cutoff=args.ve_cutoff)
    text = graph.to_json() if args.format == 'json' else graph.to_dot()
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text if text.endswith('\n') else text + '\n')
    return 0
