"""GHN meta-training: steps on real CIFAR-10 images, checkpoints, resume, DDP, NaN guard, exact fast path."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, shared_file

import ghnviz
from ghnviz import train as tr
from ghnviz.zoo.deepnets1m.space import sample_architecture

# Tiny but real: 2 architectures per step, 8 images, widths capped at 8, a GHN-2 with hid=16.
TINY = dict(
    batch_size=8,
    limit_per_class=10,
    meta_batch=2,
    arch_pool=20,
    max_width=8,
    max_cells=8,
    hid=16,
    max_shape=(16, 16, 7, 7),
    milestones=(),
    save_every_s=1e9,
    log_every=1,
)


def tiny_config(tmp_path, **kw) -> tr.TrainConfig:
    data = shared_file('data', 'cifar10-jpeg.tar.xz')
    return tr.TrainConfig(data_path=str(data), out_dir=str(tmp_path / 'run'), **{**TINY, **kw})


def read_csv(path) -> list[dict]:
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_train_checkpoint_and_exact_resume(tmp_path):
    """3 steps straight, vs 2 steps then a resumed run to 3: same files, same numbers."""
    straight = tiny_config(tmp_path / 'a', steps=3)
    summary = tr.train(straight)
    out = tmp_path / 'a' / 'run'
    assert summary['steps'] == 3
    rows = read_csv(out / tr.METRICS)
    assert [int(r['step']) for r in rows] == [1, 2, 3]
    assert all(math.isfinite(float(r['loss'])) and 0 <= float(r['acc']) <= 1 for r in rows)
    assert all(float(r['archs_per_s']) > 0 for r in rows)
    card = tr.load_card(out)
    assert card['step'] == 3 and card['train_config']['hid'] == 16 and card['arch'] == 'ghn2'
    ghn = ghnviz.load_ghn(out / tr.CHECKPOINT)
    assert ghn.config.hid == 16 and ghn.config.max_shape == (16, 16, 7, 7)
    state = torch.load(out / tr.STATE, weights_only=True)  # plain tensors and containers only
    assert state['step'] == 3 and 'state' in state['optimizer']

    first = tiny_config(tmp_path / 'b', steps=2)
    tr.train(first)
    assert tr.load_card(tmp_path / 'b' / 'run')['step'] == 2
    tr.train(dataclasses.replace(first, steps=3), resume=True)
    a, b = (ghnviz.load_ghn(p / 'run' / tr.CHECKPOINT).state_dict() for p in (tmp_path / 'a', tmp_path / 'b'))
    assert all(torch.equal(a[k], b[k]) for k in a), 'a resumed run must continue the same sequence'
    resumed = read_csv(tmp_path / 'b' / 'run' / tr.METRICS)
    assert [int(r['step']) for r in resumed] == [1, 2, 3]
    assert [r['loss'] for r in resumed] == [r['loss'] for r in rows]
    assert tr.load_card(tmp_path / 'b' / 'run')['step'] == 3
    curve = tr.learning_curve(tmp_path / 'b' / 'run' / tr.METRICS, window=2)
    assert [c['step'] for c in curve] == [2, 3] and curve[0]['loss'] > 0


def test_init_from_continues_weights_and_step_count(tmp_path):
    """A new run started from another run's weights: same tensors, step count and time carried on."""
    first = tiny_config(tmp_path / 'a', steps=2)
    tr.train(first)
    src = tmp_path / 'a' / 'run' / tr.CHECKPOINT
    # lr=0: the weights cannot move, so the new checkpoint must equal the one it started from
    frozen = tiny_config(tmp_path / 'b', steps=3, lr=0.0, init_from=str(src))
    tr.train(frozen)
    a, b = (ghnviz.load_ghn(p / 'run' / tr.CHECKPOINT).state_dict() for p in (tmp_path / 'a', tmp_path / 'b'))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [int(r['step']) for r in read_csv(tmp_path / 'b' / 'run' / tr.METRICS)] == [3]
    card_a, card_b = tr.load_card(tmp_path / 'a' / 'run'), tr.load_card(tmp_path / 'b' / 'run')
    assert card_b['step'] == 3 and card_b['elapsed_s'] > card_a['elapsed_s']
    # a cosine schedule picks up where the step count has it, with a fresh optimizer
    cos = tiny_config(tmp_path / 'c', steps=4, scheduler='cosine', lr=1e-3, init_from=str(src))
    tr.train(cos)
    lrs = [float(r['lr']) for r in read_csv(tmp_path / 'c' / 'run' / tr.METRICS)]
    expected = [1e-3 * tr.SCHEDULERS['cosine'](cos)(s) for s in (2, 3)]
    assert lrs == pytest.approx(expected) and lrs[0] < 1e-3
    with pytest.raises(ValueError, match='hid'):
        tr.train(tiny_config(tmp_path / 'd', steps=3, hid=8, init_from=str(src)))


def test_resume_applies_the_new_lr_and_steps(tmp_path):
    """Resuming with another --lr/--steps: the schedule is recomputed with them at the resumed step."""
    first = tiny_config(tmp_path, steps=2, scheduler='cosine', lr=1e-3, weight_decay=0.0)
    tr.train(first)
    again = dataclasses.replace(first, steps=5, lr=4e-3, weight_decay=1e-4)
    tr.train(again, resume=True)
    rows = read_csv(tmp_path / 'run' / tr.METRICS)
    assert [int(r['step']) for r in rows] == [1, 2, 3, 4, 5]
    expected = [4e-3 * tr.SCHEDULERS['cosine'](again)(s) for s in (2, 3, 4)]
    assert [float(r['lr']) for r in rows[2:]] == pytest.approx(expected)
    state = torch.load(tmp_path / 'run' / tr.STATE, weights_only=True)
    assert all(g['weight_decay'] == 1e-4 for g in state['optimizer']['param_groups'])


def test_time_limit_and_stop_file_end_the_run_with_a_checkpoint(tmp_path):
    """max_seconds or a fresh OUT/STOP stop after the current step, save, and --resume carries on exactly."""
    straight = tiny_config(tmp_path / 'a', steps=3)
    tr.train(straight)

    cfg = tiny_config(tmp_path / 'b', steps=3)
    summary = tr.train(cfg, max_seconds=0.0)
    out = tmp_path / 'b' / 'run'
    assert summary['stopped'] == 'time limit' and summary['steps'] == 1
    assert tr.load_card(out)['step'] == 1 and torch.load(out / tr.STATE, weights_only=True)['step'] == 1
    (out / tr.STOP_FILE).touch()
    summary = tr.train(cfg, resume=True)
    assert summary['stopped'] == 'STOP file' and summary['steps'] == 2
    assert not (out / tr.STOP_FILE).exists() and tr.load_card(out)['step'] == 2
    stale = out / tr.STOP_FILE
    stale.touch()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))  # left over from an earlier call: ignored
    summary = tr.train(cfg, resume=True)
    assert summary['stopped'] is None and summary['steps'] == 3
    assert [int(r['step']) for r in read_csv(out / tr.METRICS)] == [1, 2, 3]
    a, b = (ghnviz.load_ghn(p / 'run' / tr.CHECKPOINT).state_dict() for p in (tmp_path / 'a', tmp_path / 'b'))
    assert all(torch.equal(a[k], b[k]) for k in a), 'stopping and resuming must not change the run'


def test_resume_refuses_another_ghn(tmp_path):
    cfg = tiny_config(tmp_path, steps=1)
    tr.train(cfg)
    with pytest.raises(ValueError, match='hid'):
        tr.train(dataclasses.replace(cfg, hid=8, steps=2), resume=True)


@pytest.mark.parametrize('native', [True, False])
def test_amp_auto_takes_bf16_only_on_cpus_that_compute_it(tmp_path, monkeypatch, caplog, native):
    """amp='auto': bf16 autocast where the CPU has bf16 instructions, fp32 elsewhere; the card says which."""
    seen = []
    real = tr.meta_batch_loss

    def spy(*args, **kwargs):
        seen.append(args[5])  # the autocast dtype
        return real(*args, **kwargs)

    monkeypatch.setattr(tr, 'meta_batch_loss', spy)
    monkeypatch.setattr(tr, 'cpu_has_native_bf16', lambda: native)
    tr.train(tiny_config(tmp_path, steps=1, amp='auto', device='cpu'))
    assert seen == [torch.bfloat16 if native else None]
    assert tr.load_card(tmp_path / 'run')['train_config']['amp'] == ('bf16' if native else 'none')
    # an explicit bf16 is kept, with a warning where it would be emulated
    caplog.clear()
    assert tr.resolve_amp('bf16', torch.device('cpu')) == 'bf16'
    assert ('amp=none or amp=auto' in caplog.text) is not native
    with pytest.raises(ValueError, match='fp16 needs CUDA'):
        tr.resolve_amp('fp16', torch.device('cpu'))
    with pytest.raises(ValueError, match="'auto'"):
        tr.TrainConfig(amp='fp8')


def test_cpu_bf16_detection_agrees_with_the_kernel():
    """Checked against the CPU flags Linux reports (avx512_bf16 or amx_tile), a source torch does not use."""
    with open('/proc/cpuinfo') as f:
        flags = {w for line in f if line.startswith('flags') for w in line.split(':', 1)[1].split()}
    assert tr.cpu_has_native_bf16() == bool(flags & {'avx512_bf16', 'amx_tile'})


def test_nan_guard_skips_the_step(tmp_path, monkeypatch, caplog):
    real = tr.meta_batch_loss
    calls = {'n': 0}

    def nan_on_second(*args, **kwargs):
        calls['n'] += 1
        loss, correct = real(*args, **kwargs)
        return (loss * float('nan') if calls['n'] == 2 else loss), correct

    monkeypatch.setattr(tr, 'meta_batch_loss', nan_on_second)
    summary = tr.train(tiny_config(tmp_path, steps=2))
    assert summary['steps'] == 2 and summary['failures'] == 1 and calls['n'] == 3
    assert 'non-finite loss' in caplog.text
    ghn = ghnviz.load_ghn(tmp_path / 'run' / tr.CHECKPOINT)
    assert all(torch.isfinite(p).all() for p in ghn.parameters())
    assert [int(r['failures']) for r in read_csv(tmp_path / 'run' / tr.METRICS)] == [0, 1]


def test_gives_up_after_consecutive_failures(tmp_path, monkeypatch):
    real = tr.meta_batch_loss

    def always_nan(*args, **kwargs):
        loss, correct = real(*args, **kwargs)
        return loss * float('nan'), correct

    monkeypatch.setattr(tr, 'meta_batch_loss', always_nan)
    with pytest.raises(RuntimeError, match='consecutive'):
        tr.train(tiny_config(tmp_path, steps=2, max_failures=3))


@pytest.mark.parametrize('index', [2, 11, 14])
def test_fast_path_matches_predict(index):
    """Shape-only network + pruned dead ops + functional_call == ghn.predict into a real network."""
    torch.manual_seed(0)
    ghn = tr.build_ghn(tr.TrainConfig(hid=16, max_shape=(16, 16, 7, 7)), 10).eval()
    spec = dataclasses.replace(sample_architecture('train', index), C=16)
    arch = tr.prepare_arch(spec, 10, ghn.config.ve_cutoff)
    model = spec.build(num_classes=10, is_imagenet_input=False).eval()
    pred = ghn.predict(model)
    params = tr.predict_params(ghn, [arch])[0]
    assert set(params) - set(arch.fill) == set(pred.predicted)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = torch.func.functional_call(arch.model.eval(), params, (x,), strict=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('arch', ['ghn2', 'ghn3'])
def test_predicted_params_carry_gradients(arch):
    ghn = tr.build_ghn(
        tr.TrainConfig(arch=arch, hid=16, max_shape=(16, 16, 7, 7), heads=4, layers=2), 10
    ).train()
    assert ghn.arch == arch
    archs = [
        tr.prepare_arch(dataclasses.replace(sample_architecture('train', i), C=8), 10, 50) for i in (3, 5)
    ]
    params = tr.predict_params(ghn, archs)
    loss, correct = tr.meta_batch_loss(archs, params, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert 0 <= correct.item() <= 8
    assert ghn.decoder.conv[0].weight.grad is not None and ghn.op_embed.weight.grad.abs().sum() > 0
    params = tr.predict_params(ghn, archs)  # bf16 autocast (depthwise convolutions stay float32)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    loss16, _ = tr.meta_batch_loss(archs, params, x, torch.tensor([0, 1, 2, 3]), 0.1, torch.bfloat16)
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)


def test_sampler_respects_node_budget_and_resumes():
    cfg = tr.TrainConfig(meta_batch=2, max_nodes=250, arch_pool=20, max_width=8)
    a = tr.ArchSampler(cfg, 10, 50)
    for _ in range(2):
        assert sum(x.n_nodes for x in a.next_batch()) <= 250
    state = a.state_dict()
    nxt = [x.name for x in a.next_batch()]
    b = tr.ArchSampler(cfg, 10, 50)
    b.load_state_dict(state)
    assert [x.name for x in b.next_batch()] == nxt


def test_ddp_two_processes_gloo(tmp_path):
    data = shared_file('data', 'cifar10-jpeg.tar.xz')
    out = tmp_path / 'ddp'
    args = [
        f'--{k.replace("_", "-")}={",".join(map(str, v)) if isinstance(v, tuple) else v}'
        for k, v in TINY.items()
    ]
    args = [a for a in args if not a.startswith('--milestones')] + ['--milestones=0.5']
    cmd = [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--nproc_per_node=2',
        '--standalone',
        '-m',
        'ghnviz',
    ]
    cmd += [
        'train',
        '--steps=2',
        f'--out-dir={out}',
        f'--data-path={data}',
        '--device=cpu',
        '--no-progress',
        *args,
    ]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((out / tr.CARD).read_text())
    assert card['step'] == 2 and card['world_size'] == 2
    state = torch.load(out / tr.STATE, weights_only=True)
    assert len(state['ranks']) == 2
    assert (
        state['ranks'][0]['sampler']['pos'] != state['ranks'][1]['sampler']['pos']
    )  # ranks read different archs
    rows = read_csv(out / tr.METRICS)
    assert [int(r['step']) for r in rows] == [1, 2] and float(rows[-1]['archs_per_s']) > 0


def test_cli_lists_every_config_field():
    from ghnviz.cli import build_parser
    from ghnviz.cli_train import _field_help

    parser = build_parser()
    args = parser.parse_args(['train', '--max-shape', '32,32,7,7', '--no-ve', '--limit-per-class', 'none'])
    assert args.max_shape == (32, 32, 7, 7) and args.ve is False and args.limit_per_class is None
    comments = _field_help(tr.TrainConfig)
    assert all(comments.get(f.name) for f in dataclasses.fields(tr.TrainConfig)), (
        'every field needs a comment'
    )
    helps = {a.dest: a.help for a in parser._subparsers._group_actions[0].choices['train']._actions}
    assert 'reference' in helps['max_nodes'] and '2200' in helps['max_nodes']


def test_cli_max_minutes_must_be_positive(tmp_path, capsys):
    from ghnviz.cli import main

    assert main(['train', '--out-dir', str(tmp_path / 'run'), '--max-minutes', '0', '--no-progress']) == 2
    assert '--max-minutes must be positive' in capsys.readouterr().err
    assert not (tmp_path / 'run').exists()
