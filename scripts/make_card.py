"""Ship a GHN training run as the default GHN: checkpoint, card, learning curve.

Copies ``RUN/ghn.safetensors`` to ``assets/ghn_default.safetensors``, ``RUN/metrics.csv`` to
``docs/ghn_default_training.csv`` and writes ``assets/ghn_default.json`` (the model card the app shows)
from the run's own card (``RUN/ghn.json``: configs, step, elapsed time) and an evaluation JSON written by
``python -m ghnviz evaluate --json``.

    python scripts/make_card.py --run runs/ghn_default --eval docs/ghn_default_eval.json \\
        --eval-command "python -m ghnviz evaluate ..." --status "..."
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))


def curve_summary(rows: list[dict], windows: list[tuple[int, int]]) -> str:
    """Mean training-batch accuracy over step windows, and the median loss of the first and last window."""
    parts, losses = [], []
    for lo, hi in windows:
        chunk = [r for r in rows if lo <= int(r['step']) <= hi]
        if not chunk:
            continue
        parts.append(f'steps {lo}-{hi} {100 * statistics.fmean(float(r["acc"]) for r in chunk):.1f}%')
        losses.append(statistics.median(float(r['loss']) for r in chunk))
    return (
        'mean training-batch accuracy of the predicted networks: '
        + ', '.join(parts)
        + f'; median loss {losses[0]:.2f} -> {losses[-1]:.2f}'
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--run', type=Path, default=REPO / 'runs' / 'ghn_default', help='training output folder')
    p.add_argument('--eval', type=Path, required=True, help='JSON written by `ghnviz evaluate --json`')
    p.add_argument('--eval-command', required=True, help='the evaluate command line, for the card')
    p.add_argument('--status', default='', help='a sentence on where this GHN stands')
    p.add_argument('--command', default='scripts/train_default.sh (resumable; its header gives the history)')
    p.add_argument('--hardware', default='shared 2-core x86_64 CPU (no GPU), torchrun 2 processes x 1 thread')
    args = p.parse_args()

    run_card = json.loads((args.run / 'ghn.json').read_text())
    ev = json.loads(args.eval.read_text())
    with open(args.run / 'metrics.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    step = int(run_card['step'])
    if int(rows[-1]['step']) != step:
        raise SystemExit(f'metrics.csv ends at step {rows[-1]["step"]}, the checkpoint is at step {step}')

    ckpt = REPO / 'assets' / 'ghn_default.safetensors'
    shutil.copyfile(args.run / 'ghn.safetensors', ckpt)
    shutil.copyfile(args.run / 'metrics.csv', REPO / 'docs' / 'ghn_default_training.csv')
    cfg = run_card['train_config']
    windows = [(lo, lo + 99) for lo in (1, 101, 501, 1001, 1501, 2001) if lo + 99 < step - 99]
    windows.append((step - 99, step))
    card = {
        'name': 'ghn_default',
        'file': 'assets/ghn_default.safetensors',
        'sha256': hashlib.sha256(ckpt.read_bytes()).hexdigest(),
        'arch': run_card['arch'],
        'ghn_config': run_card['ghn_config'],
        'train_config': cfg,
        'step': step,
        'data': (
            f'{cfg["dataset"].upper()} train split from the offline JPEG archive '
            f'{Path(cfg["data_path"]).name}; crop+flip augmentation; batch {cfg["batch_size"]} per process'
        ),
        'architectures': (
            f'first {cfg["arch_pool"]:,} DeepNets-1M {cfg["split"]}-split architectures (ghnviz space), '
            f'C capped at {cfg["max_width"]}'
        ),
        'hardware': args.hardware,
        'wall_time_s': round(float(rows[-1]['elapsed_s'])),
        'command': args.command,
        'learning_curve': 'docs/ghn_default_training.csv (training-batch loss and accuracy per step)',
        'learning_curve_summary': curve_summary(rows, windows),
        'evaluation': {
            'command': args.eval_command,
            'mean_top1': ev['mean_top1'],
            'std_top1': ev.get('std_top1'),
            'n': ev['n'],
            'test_images': f'{ev["n_images"]} ({ev["bn"]})',
            'baselines': {k: v.get('top1') for k, v in ev.get('baselines', {}).items()},
            'full_results': str(args.eval.resolve().relative_to(REPO)),
        },
        'status': args.status,
    }
    (REPO / 'assets' / 'ghn_default.json').write_text(json.dumps(card, indent=1) + '\n')
    print(json.dumps({k: card[k] for k in ('step', 'wall_time_s', 'learning_curve_summary')}, indent=1))
    print(json.dumps(card['evaluation'], indent=1))


if __name__ == '__main__':
    main()
