"""Fine-tuning from default, GHN-predicted and post-processed inits, and filter diversity, as markdown.

Usage:
    python scripts/finetune_results.py --ghn default [--steps 60] [--seeds 3] [--eval-limit 1000]
    python scripts/finetune_results.py --ghn path/to/ghn.safetensors --card path/to/ghn.json \\
        --label "an intermediate checkpoint of the shipped GHN" --steps 20

Part 1 fine-tunes torchvision ResNet-18 (adapted to 32x32) on 100-shot CIFAR-10 for a fixed number of
SGD steps from each init of :data:`ghnviz.finetune.INITS` and several seeds, through
:func:`ghnviz.finetune.finetune` (its defaults: lr 0.01, wd 0.01, momentum 0.9, warm-up then cosine).
The 100-shot training subset and the class-balanced test subset are fixed (``--data-seed``); the run
seed changes batch order, augmentation, the default init and the post-processing noise. Test accuracy
is reported before training (step 0) and after the last step, with the CPU seconds each run took.

Part 2 reports filter diversity (mean |correlation| between output filters, ``diversity`` of
:func:`ghnviz.weight_stats`) and the effective-rank ratio of default-init, GHN-predicted and
post-processed weights, averaged over the >=2-D tensors of each model, plus a per-stage table for the
first model.

Writes the markdown (``--out``) and a JSON file with every run (``--json``).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

# Other scripts in this folder have module-like names (coverage.py); import nothing from here.
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import ghnviz  # noqa: E402
from ghnviz.finetune import INITS, FinetuneConfig, build_model, finetune, initialise  # noqa: E402
from ghnviz.hyper.io import resolve_checkpoint  # noqa: E402
from ghnviz.stats import model_summary_stats  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.xz'
MODEL = 'resnet18'  # the fine-tuned model
NUM_CLASSES = 10  # CIFAR-10


# ---------------------------------------------------------------------------------------------- GHN
def ghn_info(ghn: str, card: str | None) -> dict:
    """Path, sha256, architecture and (from a training card) the training step of the GHN file."""
    path = resolve_checkpoint(ghn)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    net = ghnviz.load_ghn(path)
    info = {
        'ghn': ghn,
        'path': str(path),
        'sha256': digest,
        'arch': net.arch,
        'num_classes': getattr(net.config, 'num_classes', None),
        'n_params': sum(p.numel() for p in net.parameters()),
    }
    card_path = Path(card) if card else path.with_name('ghn.json')
    if card_path.exists():
        meta = json.loads(card_path.read_text())
        info.update(card=str(card_path), step=meta.get('step'))
        total = meta.get('train_config', {}).get('steps')
        if total is not None:
            info['total_steps'] = total
    return info


# ---------------------------------------------------------------------------------------------- part 1
class _SetupClock(logging.Handler):
    """Records the process CPU time when a fine-tuning run announces its training loop."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.at is None and ': training ' in record.getMessage():
            self.at = time.process_time()


def _one_run(args, init: str, seed: int, first: dict | None) -> dict:
    """One fine-tuning run; ``first``: the seed-0 record of this init when its step 0 may be reused."""
    ft_log = logging.getLogger('ghnviz.finetune')
    ft_log.setLevel(logging.INFO)
    # A GHN init without noise is the same for every seed when the GHN predicts every parameter
    # (BatchNorm buffers keep their fixed initial values): its step-0 evaluation is done once.
    reuse = bool(
        first
        and not args.all_step0
        and INITS[init][0]
        and INITS[init][2] == 0
        and first['init_report'].get('skipped') == 0
    )
    cfg = FinetuneConfig(
        model=MODEL,
        init=init,
        ghn=args.ghn_path,
        layer=args.layer,
        beta=args.beta if INITS[init][2] > 0 else None,  # None: 0 for the inits without noise
        data_path=args.data_path,
        shots=args.shots,
        steps=args.steps,
        batch_size=args.batch_size,
        eval_every=0,  # only at step 0 and at the end
        eval_limit=args.eval_limit or None,
        seed=seed,
        data_seed=args.data_seed,
        device='cpu',
        threads=args.threads,
        eval_at_start=not reuse,
        bn_recalibrate=args.bn_recalibrate,
    )
    clock = _SetupClock()
    ft_log.addHandler(clock)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        res = finetune(cfg, progress=False)
    finally:
        ft_log.removeHandler(clock)
    cpu_s, wall_s = time.process_time() - cpu, time.perf_counter() - wall
    end = res.history[-1]
    start = {'test/acc': first['acc0'], 'test/loss': first['loss0']} if reuse else res.history[0]
    rec = dict(
        init=init,
        seed=seed,
        steps=res.steps,
        acc0=start['test/acc'],
        loss0=start['test/loss'],
        step0_evaluated=not reuse,  # False: the identical init of seed 0 was evaluated
        acc=end['test/acc'],
        loss=end['test/loss'],
        train_loss=res.metrics.get('train/loss'),
        cpu_s=cpu_s,
        setup_cpu_s=None if clock.at is None else clock.at - cpu,
        wall_s=wall_s,
        init_report={k: v for k, v in res.init.items() if k != 'skipped_reasons'},
    )
    print(
        f'{init:>15} seed {seed}: step 0 {rec["acc0"]:5.1f} %, step {res.steps} {rec["acc"]:5.1f} % '
        f'(train loss {rec["train_loss"]:.3f}); {cpu_s:.0f} s CPU, {wall_s:.0f} s wall',
        flush=True,
    )
    return rec


def finetune_runs(args) -> list[dict]:
    """One fine-tuning run per (init, seed); returns one JSON-able record per run.

    With ``--workers N`` > 1 the runs go to N worker processes (each run still uses ``--threads``) and
    every run evaluates its own step 0.
    """
    jobs = [(init, seed) for init in args.inits for seed in range(args.seeds)]
    if args.workers <= 1:
        records: list[dict] = []
        for init, seed in jobs:
            first = next((r for r in records if r['init'] == init and r['seed'] == 0), None)
            records.append(_one_run(args, init, seed, first))
        return records
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(args.workers, mp_context=get_context('spawn')) as pool:
        futures = [pool.submit(_one_run, args, init, seed, None) for init, seed in jobs]
        return [f.result() for f in futures]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise_runs(records: list[dict], inits: list[str]) -> list[dict]:
    rows = []
    for init in inits:
        rs = [r for r in records if r['init'] == init]
        row = {'init': init, 'n': len(rs)}
        for key in ('acc0', 'loss0', 'acc', 'loss', 'train_loss', 'cpu_s', 'wall_s'):
            row[key], row[key + '_std'] = _mean_std([r[key] for r in rs])
        row['acc_per_seed'] = [r['acc'] for r in rs]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- part 2
def diversity_rows(args, models: list[str]) -> tuple[list[dict], list[dict]]:
    """Mean diversity / effective-rank ratio per model and init; per-stage diversity of the first model."""
    rows, stages = [], []
    for name in models:
        t0 = time.process_time()
        frames, skipped = {}, 0
        for init in args.inits:
            with torch.random.fork_rng():
                torch.manual_seed(0)  # the same default init as fine-tuning seed 0
                model = build_model(name, NUM_CLASSES, 32)
                beta = args.beta if INITS[init][2] > 0 else None
                cfg = FinetuneConfig(
                    model=name, init=init, ghn=args.ghn_path, layer=args.layer, beta=beta, seed=0
                )
                report = initialise(model, cfg, NUM_CLASSES)
            frames[init] = ghnviz.weight_stats(model, reference_init=init == 'ghn')
            if init == 'ghn':
                skipped = report.get('skipped', 0)
        for init, df in frames.items():
            s = model_summary_stats(df)
            rows.append(
                dict(
                    model=name,
                    init=init,
                    diversity=s['diversity'],
                    eff_rank_ratio=s['eff_rank_ratio'],
                    n_tensors=int((df['ndim'] >= 2).sum()),
                )
            )
            if init == 'ghn':
                rows.append(
                    dict(
                        model=name,
                        init='reference init (init_diversity)',
                        diversity=s['init_diversity'],
                        eff_rank_ratio=s['init_eff_rank_ratio'],
                        n_tensors=int((df['ndim'] >= 2).sum()),
                    )
                )
        for r in rows:
            if r['model'] == name:
                r['ghn_skipped_tensors'] = skipped
        if name == models[0]:
            for init, df in frames.items():
                mats = df[df['ndim'] >= 2].copy()
                mats['stage'] = mats['name'].str.split('.').str[0]
                for stage, g in mats.groupby('stage', sort=False):
                    stages.append(
                        dict(
                            model=name,
                            init=init,
                            stage=stage,
                            n=len(g),
                            diversity=float(g['diversity'].mean()),
                        )
                    )
        print(f'diversity {name}: {time.process_time() - t0:.0f} s CPU', flush=True)
    return rows, stages


# ---------------------------------------------------------------------------------------------- output
def _pm(m: float, s: float, digits: int = 1) -> str:
    return f'{m:.{digits}f} ± {s:.{digits}f}'


def _prediction_note(runs: list[dict]) -> str:
    """What the GHN predicted for the fine-tuned model, from the first GHN run's init report."""
    rep = next((r['init_report'] for r in runs if 'predicted' in r['init_report']), None)
    if rep is None:
        return ''
    cls = (
        'classifier included' if rep.get('class_layers_predicted') else 'classifier kept at its default init'
    )
    return (
        f'The GHN predicts {rep["predicted"]} parameter tensors ({cls}; {rep["skipped"]} kept at the default '
        'init); BatchNorm running statistics keep their initial values (mean 0, variance 1). '
    )


def markdown(res: dict) -> str:
    m, g, a = res['meta'], res['ghn'], res['args']
    parts = []
    if res.get('runs'):
        task = f'{a["shots"]}-shot CIFAR-10, {a["steps"]} steps'
        parts.append(f'Fine-tuning from GHN-predicted parameters ({task})')
    if res.get('diversity'):
        parts.append('filter diversity' if parts else 'Filter diversity of GHN-predicted parameters')
    lines = ['## ' + ' and '.join(parts), '']
    if a['label']:
        lines += [f'> **{a["label"]}.**', '']
    step = ''
    if g.get('step') is not None:
        step = f', training step {g["step"]}' + (f' of {g["total_steps"]}' if 'total_steps' in g else '')
    lines += [
        f'GHN: `{Path(g["path"]).name}` ({g["arch"]}, {g["n_params"]:,} parameters, '
        f'{g["num_classes"]} classes{step}; file sha256 `{g["sha256"][:16]}`).',
        '',
        f'Command (from the repository root, {m["date"]}, on {m["machine"]}):',
        '',
        '```',
        m['command'],
        '```',
        '',
    ]
    if res.get('runs'):
        pp = (
            'orthogonalisation from layer {layer} (all >=2-D weights but the classifier), noise beta {beta:g}'
        )
        lines += [
            '### Fine-tuning',
            '',
            f'Model: torchvision ResNet-18 adapted to 32x32 (3x3 stride-1 stem, no max-pool), 10 classes. '
            f'Data: {a["shots"]} training images per class (a fixed subset, data seed {a["data_seed"]}), '
            f'{a["steps"]} SGD steps at batch {a["batch_size"]} '
            f'({a["steps"] * a["batch_size"] / (10 * a["shots"]):.2f} epochs), '
            f'lr {res["config"]["lr"]} with {res["config"]["warmup"]} warm-up step(s) then cosine decay '
            f'to 0, momentum {res["config"]["momentum"]}, weight decay {res["config"]["wd"]}, gradient clip '
            f'{res["config"]["grad_clip"]}, crop + flip augmentation; BatchNorm in train mode while '
            'training, '
            + (
                'running statistics at test time (never recalibrated). '
                if not a.get('bn_recalibrate')
                else f'running statistics re-estimated on {a["bn_recalibrate"]} training batches before each '
                'evaluation. '
            )
            + (
                f'Test: a fixed class-balanced subset of {a["eval_limit"]} of the 10,000 test images. '
                if a['eval_limit']
                else 'Test: all 10,000 test images. '
            )
            + f'Post-processing: {pp.format(layer=a["layer"], beta=a["beta"])}'
            + (
                ' (no published preset for ResNet-18; layer 0 transforms every layer). '
                if a['layer'] == 0
                else '. '
            )
            + _prediction_note(res['runs'])
            + f'Seeds 0-{a["seeds"] - 1} change batch order, augmentation, the default init and the noise'
            + (
                '; the inits without noise are the same for every seed, so their step 0 is evaluated once '
                '(seed 0) and reused. '
                if any(not r['step0_evaluated'] for r in res['runs'])
                else '. '
            )
            + 'One torch thread per run; CPU seconds cover the whole run (data from the decoded cache, '
            f'init, the evaluations and the {a["steps"]} steps).',
            '',
            f'| init | test acc. at step 0 (%) | test acc. after {a["steps"]} steps (%) | per seed '
            '| test loss at step 0 | test loss at the end | train loss (last 10 steps) | CPU s per run '
            '| wall s per run |',
            '|---|---:|---:|---|---:|---:|---:|---:|---:|',
        ]
        for r in res['summary']:
            lines.append(
                f'| {r["init"]} | {_pm(r["acc0"], r["acc0_std"])} | {_pm(r["acc"], r["acc_std"])} '
                f'| {" / ".join(f"{v:.1f}" for v in r["acc_per_seed"])} '
                f'| {_pm(r["loss0"], r["loss0_std"], 3)} '
                f'| {_pm(r["loss"], r["loss_std"], 3)} | {_pm(r["train_loss"], r["train_loss_std"], 3)} '
                f'| {r["cpu_s"]:.0f} | {r["wall_s"]:.0f} |'
            )
        setup = [r['setup_cpu_s'] for r in res['runs'] if r['setup_cpu_s'] is not None]
        lines += [
            '',
            f'Mean ± sample std over {a["seeds"]} seeds. Total: {res["totals"]["finetune_cpu_s"]:.0f} s CPU, '
            f'{res["totals"]["finetune_wall_s"]:.0f} s wall for {len(res["runs"])} runs'
            + (
                f' (setup before the first evaluation: {statistics.fmean(setup):.1f} s CPU per run)'
                if setup
                else ''
            )
            + f'; CPU / wall = {res["totals"]["finetune_cpu_s"] / res["totals"]["finetune_wall_s"]:.2f} '
            f'with {a.get("workers", 1)} run(s) at a time on the shared machine.',
            '',
            'Per run:',
            '',
            '| init | seed | test acc. step 0 | test acc. end | test loss end | train loss '
            '| CPU s | wall s |',
            '|---|---:|---:|---:|---:|---:|---:|---:|',
        ]
        for r in res['runs']:
            acc0 = f'{r["acc0"]:.1f}' + ('' if r['step0_evaluated'] else ' (seed 0)')
            lines.append(
                f'| {r["init"]} | {r["seed"]} | {acc0} | {r["acc"]:.1f} | {r["loss"]:.3f} '
                f'| {r["train_loss"]:.3f} | {r["cpu_s"]:.0f} | {r["wall_s"]:.0f} |'
            )
        lines.append('')
    if res.get('diversity'):
        lines += [
            '### Filter diversity',
            '',
            '`diversity`: mean |Pearson correlation| between distinct output filters of a weight '
            '(lower: more diverse), averaged over the >=2-D weights of the model; `eff. rank ratio`: '
            'effective rank / min(out, in*k*k), averaged the same way. Models are built for 32x32 inputs '
            '(default init from seed 0); post-processing as above (layer '
            f'{a["layer"]}, beta {a["beta"]:g}, seed 0). *Reference init* is the `init_diversity` column of '
            '`weight_stats` (each layer re-initialised with its `reset_parameters`).',
            '',
            '| model | init | weights | diversity | eff. rank ratio |',
            '|---|---|---:|---:|---:|',
        ]
        for r in res['diversity']:
            lines.append(
                f'| {r["model"]} | {r["init"]} | {r["n_tensors"]} | {r["diversity"]:.4f} '
                f'| {r["eff_rank_ratio"]:.3f} |'
            )
        skipped = {r['model']: r['ghn_skipped_tensors'] for r in res['diversity']}
        if any(skipped.values()):
            lines += [
                '',
                'Tensors the GHN could not predict (kept at their default init): '
                + ', '.join(f'{k} {v}' for k, v in skipped.items())
                + '.',
            ]
        if res.get('stages'):
            inits = list(dict.fromkeys(r['init'] for r in res['stages']))
            stage_names = list(dict.fromkeys(r['stage'] for r in res['stages']))
            cell = {(r['init'], r['stage']): r for r in res['stages']}
            model = res['stages'][0]['model']
            lines += [
                '',
                f'Per stage of {model} (mean `diversity` over the >=2-D weights of each top-level module):',
                '',
                '| init | ' + ' | '.join(f'{s} ({cell[(inits[0], s)]["n"]})' for s in stage_names) + ' |',
                '|---|' + '---:|' * len(stage_names),
            ]
            for init in inits:
                lines.append(
                    f'| {init} | '
                    + ' | '.join(f'{cell[(init, s)]["diversity"]:.4f}' for s in stage_names)
                    + ' |'
                )
        lines += ['', f'Diversity part: {res["totals"]["diversity_cpu_s"]:.0f} s CPU.', '']
    lines += [
        f'Software: torch {m["torch"]}, Python {m["python"]}. Every number is in `{Path(a["json"]).name}`.',
        '',
    ]
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--ghn', default='default', help='GHN file or name [default: the shipped CIFAR-10 GHN]')
    p.add_argument(
        '--card', default=None, help='training card (ghn.json) with the step [default: next to the GHN]'
    )
    p.add_argument('--label', default='', help='a note shown at the top of the markdown')
    p.add_argument('--steps', type=int, default=60, help='SGD steps per run [60]')
    p.add_argument('--seeds', type=int, default=3, help='seeds per init [3]')
    p.add_argument('--inits', default=','.join(INITS), help='comma-separated inits [all]')
    p.add_argument('--batch-size', type=int, default=64, help='[64]')
    p.add_argument('--shots', type=int, default=100, help='training images per class [100]')
    p.add_argument(
        '--eval-limit', type=int, default=1000, help='class-balanced test subset; 0: all 10,000 [1000]'
    )
    p.add_argument('--data-seed', type=int, default=0, help='seed of the training and test subsets [0]')
    p.add_argument('--data-path', default=str(DEFAULT_DATA), help='CIFAR-10 archive [../shared/data/...]')
    p.add_argument('--layer', type=int, default=0, help='first post-processed layer [0: all]')
    p.add_argument('--beta', type=float, default=3e-5, help='noise scale for ghn+orth+noise [3e-5]')
    p.add_argument('--threads', type=int, default=1, help='torch threads per run [1]')
    p.add_argument('--workers', type=int, default=1, help='runs in parallel worker processes [1]')
    p.add_argument(
        '--bn-recalibrate',
        type=int,
        default=0,
        help='batches to re-estimate BN statistics before evaluating [0]',
    )
    p.add_argument(
        '--all-step0',
        action='store_true',
        help='evaluate step 0 on every run, also for seed-independent inits',
    )
    p.add_argument(
        '--diversity-models', default='resnet18,resnet50,convnext_tiny', help="comma-separated; '' to skip"
    )
    p.add_argument('--no-finetune', action='store_true', help='only the diversity part')
    p.add_argument('--out', default=str(REPO / 'docs' / 'results_finetune.md'))
    p.add_argument('--json', default=str(REPO / 'docs' / 'results_finetune.json'))
    p.add_argument('--render', metavar='JSON', help='only write --out again from a JSON this script wrote')
    args = p.parse_args(argv)
    if args.render:  # markdown again from a stored JSON, nothing re-run
        Path(args.out).write_text(markdown(json.loads(Path(args.render).read_text())))
        print(f'wrote {args.out} from {args.render}')
        return
    args.inits = [s for s in args.inits.split(',') if s]
    unknown = set(args.inits) - set(INITS)
    if unknown:
        p.error(f'unknown inits {sorted(unknown)}')
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    for h in logging.getLogger().handlers:
        h.setLevel(logging.WARNING)  # the INFO records the setup clock listens to stay off the console
    torch.set_num_threads(args.threads)

    ghn = ghn_info(args.ghn, args.card)
    args.ghn_path = ghn['path']
    cfg0 = FinetuneConfig(steps=args.steps)
    res = {
        'meta': {
            'command': 'python scripts/finetune_results.py '
            + shlex.join(sys.argv[1:] if argv is None else argv),
            'date': datetime.date.today().isoformat(),
            'machine': f'{platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs, '
            f'{args.threads} torch thread(s)',
            'torch': torch.__version__,
            'python': platform.python_version(),
        },
        'ghn': ghn,
        'args': {k: v for k, v in vars(args).items() if k != 'ghn_path'},
        'config': {
            'lr': cfg0.lr,
            'wd': cfg0.wd,
            'momentum': cfg0.momentum,
            'grad_clip': cfg0.grad_clip,
            'opt': cfg0.opt,
            'warmup': round(0.05 * args.steps),
        },
        'totals': {},
    }
    if not args.no_finetune:
        wall = time.perf_counter()
        res['runs'] = finetune_runs(args)
        res['summary'] = summarise_runs(res['runs'], args.inits)
        res['totals'].update(  # CPU: the runs' own (they may run in worker processes)
            finetune_cpu_s=sum(r['cpu_s'] for r in res['runs']), finetune_wall_s=time.perf_counter() - wall
        )
    models = [s for s in args.diversity_models.split(',') if s]
    if models:
        cpu = time.process_time()
        res['diversity'], res['stages'] = diversity_rows(args, models)
        res['totals']['diversity_cpu_s'] = time.process_time() - cpu
    Path(args.json).write_text(json.dumps(res, indent=1, default=str) + '\n')
    Path(args.out).write_text(markdown(res))
    print(f'wrote {args.out} and {args.json}')


if __name__ == '__main__':
    main()
