"""Run store (SQLite) and CLI listing/export: real files in tmp_path, a real concurrent reader process."""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import shared_file

from ghnviz import runner
from ghnviz.cli_runs import main as cli_main
from ghnviz.finetune import FinetuneConfig
from ghnviz.runs import SCHEMA_VERSION, RunCancelled, RunStore, default_db_path


@pytest.fixture
def store(tmp_path):
    with RunStore(tmp_path / 'runs.sqlite', flush_every=3) as s:
        yield s


def test_round_trip(store, tmp_path):
    assert store.journal_mode() == 'wal'
    run_id = store.create_run({'kind': 'finetune', 'model': 'resnet18', 'lr': 0.01}, name='r18')
    run = store.get_run(run_id)
    assert (run.name, run.status, run.config['model'], run.pid) == ('r18', 'queued', 'resnet18', None)
    assert store.create_run({}) == run_id + 1 and store.get_run(run_id + 1).name == f'run-{run_id + 1}'

    assert store.set_status(run_id, 'running', pid=4321)
    for step in range(1, 8):
        store.log_metrics(run_id, step, {'train/loss': 2.0 / step, 'lr': 0.1})
    store.log_metrics(run_id, 7, {'test/acc': 55.5})
    store.log_event(run_id, 'hello', level='warning')
    store.set_status(run_id, 'done', summary={'test/acc': 55.5})

    run = store.get_run(run_id)
    assert run.status == 'done' and run.pid == 4321 and run.summary == {'test/acc': 55.5}
    assert run.started is not None and run.finished >= run.started and run.seconds >= 0
    frame = store.metrics_frame(run_id)
    assert list(frame.columns) == ['run_id', 'step', 'key', 'value', 'time'] and len(frame) == 15
    wide = store.metrics_frame(run_id, wide=True)
    assert list(wide['step']) == list(range(1, 8))
    assert wide['train/loss'].tolist() == pytest.approx([2.0 / s for s in range(1, 8)])
    assert wide['test/acc'].iloc[-1] == 55.5 and wide['test/acc'].isna().sum() == 6
    assert store.latest_metrics(run_id) == {'lr': (7, 0.1), 'test/acc': (7, 55.5), 'train/loss': (7, 2.0 / 7)}
    assert [e['message'] for e in store.events(run_id)] == ['hello']
    assert [r.id for r in store.list_runs('done')] == [run_id]
    assert [r.id for r in store.list_runs()] == [run_id + 1, run_id]  # newest first
    with pytest.raises(ValueError, match='valid'):
        store.set_status(run_id, 'bogus')
    with pytest.raises(KeyError):
        store.get_run(999)

    # everything is on disk: a fresh connection sees it
    with RunStore(store.path) as other:
        assert len(other.metrics(run_id)) == 15 and other.get_run(run_id).status == 'done'

    out = tmp_path / 'out.csv'
    assert store.export_csv([run_id], out) == 15
    rows = list(csv.DictReader(out.open()))
    assert rows[0].keys() == {'run_id', 'name', 'status', 'step', 'key', 'value', 'time'}
    assert {r['name'] for r in rows} == {'r18'} and float(rows[0]['value']) == 2.0


def test_metrics_are_batched_but_committed_every_few_steps(store):
    run_id = store.create_run({})
    reader = sqlite3.connect(store.path)
    count = lambda: reader.execute('SELECT COUNT(*) FROM metrics').fetchone()[0]  # noqa: E731
    store.log_metrics(run_id, 1, {'a': 1.0})
    store.log_metrics(run_id, 2, {'a': 2.0})
    assert count() == 0  # buffered
    store.log_metrics(run_id, 3, {'a': 3.0})
    assert count() == 3  # flush_every=3 steps
    store.log_metrics(run_id, 4, {'a': float('nan'), 'b': None})
    store.set_status(run_id, 'failed', error='x')  # a status change commits what is buffered
    assert count() == 5
    assert store.metrics(run_id, 'a')[-1]['value'] is None  # NaN is stored as NULL


def test_schema_version_and_migration_guard(store):
    conn = sqlite3.connect(store.path)
    assert conn.execute('PRAGMA user_version').fetchone()[0] == SCHEMA_VERSION
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {'runs', 'metrics', 'events'} <= tables
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert 'metrics_run_key_step' in indexes
    conn.execute(f'PRAGMA user_version = {SCHEMA_VERSION + 1}')
    conn.commit()
    with pytest.raises(RuntimeError, match='newer'):
        RunStore(store.path)


def test_cancel_flag_and_track(store):
    run_id = store.create_run({})
    assert not store.cancel_requested(run_id)
    store.request_cancel(run_id)
    assert store.cancel_requested(run_id)
    with store.track(run_id) as t:
        assert store.get_run(run_id).status == 'running'
        t.summary = {'steps': 3}
        raise RunCancelled('stop')
    run = store.get_run(run_id)
    assert (run.status, run.error, run.summary) == ('cancelled', 'stop', {'steps': 3})

    failing = store.create_run({})
    with pytest.raises(ZeroDivisionError), store.track(failing):
        store.log_metrics(failing, 1, {'x': 1.0})
        1 / 0  # noqa: B018
    run = store.get_run(failing)
    assert run.status == 'failed' and 'ZeroDivisionError' in run.error
    assert len(store.metrics(failing)) == 1  # kept

    # a run that already ended is not restarted
    with pytest.raises(RunCancelled), store.track(failing):
        pass
    assert store.get_run(failing).status == 'failed'


def test_default_path_honours_ghnviz_home(monkeypatch, tmp_path):
    monkeypatch.setenv('GHNVIZ_HOME', str(tmp_path / 'home'))
    assert default_db_path() == tmp_path / 'home' / 'runs.sqlite'
    monkeypatch.delenv('GHNVIZ_HOME')
    monkeypatch.setenv('XDG_DATA_HOME', str(tmp_path / 'xdg'))
    assert default_db_path() == tmp_path / 'xdg' / 'ghnviz' / 'runs.sqlite'


_WRITER = textwrap.dedent(
    """
    import sys, time
    from ghnviz.runs import RunStore
    store = RunStore(sys.argv[1], flush_every=2)
    run_id = int(sys.argv[2])
    store.set_status(run_id, 'running')
    for step in range(1, 201):
        store.log_metrics(run_id, step, {'loss': 1.0 / step, 'acc': float(step)})
    store.set_status(run_id, 'done', summary={'steps': 200})
    """
)


def test_concurrent_reader_while_a_process_writes(store):
    """Another process writes 400 metric rows while this one polls; reads never fail and never go back."""
    run_id = store.create_run({})
    writer = subprocess.Popen([sys.executable, '-c', _WRITER, str(store.path), str(run_id)])
    seen, polls = [], 0
    reader = RunStore(store.path)
    try:
        while True:
            status = reader.get_run(run_id).status
            n = len(reader.metrics(run_id))
            frame = reader.metrics_frame(run_id, wide=True)
            assert len(frame) * 2 >= n  # each committed batch holds both keys of a step
            seen.append(n)
            polls += 1
            if status == 'done':
                break
            assert writer.poll() in (None, 0)
            time.sleep(0.005)
    finally:
        assert writer.wait(timeout=60) == 0
        reader.close()
    assert seen == sorted(seen) and seen[-1] == 400 and polls > 1
    assert sqlite3.connect(store.path).execute('PRAGMA journal_mode').fetchone()[0] == 'wal'


def test_cli_list_and_export(store, tmp_path, capsys):
    a = store.create_run({'kind': 'finetune', 'model': 'resnet18', 'init': 'ghn'}, name='alpha')
    b = store.create_run({'kind': 'finetune', 'model': 'vgg11', 'init': 'default'}, name='beta')
    for step in range(1, 4):
        store.log_metrics(a, step, {'train/loss': 1.5 - step / 10})
        store.log_metrics(b, step, {'train/loss': 2.0})
    store.log_metrics(a, 3, {'test/acc': 42.0})
    store.set_status(a, 'done')
    store.set_status(b, 'cancelled')
    store.flush()

    assert cli_main(['runs', 'list', '--db', str(store.path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ['id', 'status', 'name'] and len(lines) == 3
    assert lines[1].split()[:3] == [str(b), 'cancelled', 'beta']
    assert lines[2].split()[:3] == [str(a), 'done', 'alpha'] and lines[2].split()[-1] == '42'
    assert 'resnet18' in lines[2] and 'ghn' in lines[2]

    assert cli_main(['runs', 'list', '--status', 'done', '--db', str(store.path)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2

    out = tmp_path / 'export.csv'
    assert cli_main(['runs', 'export', '--csv', str(out), str(a), '--db', str(store.path)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and {r['run_id'] for r in rows} == {str(a)}
    assert cli_main(['runs', 'export', '--csv', str(out), '--db', str(store.path)]) == 0
    assert len(list(csv.DictReader(out.open()))) == 7

    assert cli_main(['runs', 'show', str(a), '--db', str(store.path)]) == 0
    shown = capsys.readouterr().out
    assert '"status": "done"' in shown and '"test/acc"' in shown


# ---------------------------------------------------------------------------------------------- runner
def _long_run_config(data_path) -> dict:
    """A fine-tuning run far longer than the test waits: it only ends by being stopped."""
    return FinetuneConfig(
        model='shufflenet_v2_x0_5',
        data_path=str(data_path),
        shots=2,
        steps=100_000,
        batch_size=8,
        eval_every=0,
        eval_at_start=False,
        eval_limit=20,
        threads=1,
    ).to_dict()


def _wait_for_metrics(store, run_id, n, timeout=90.0):
    deadline = time.monotonic() + timeout
    while len(store.metrics(run_id, 'train/loss')) < n:
        runner.reconcile(store)
        run = store.get_run(run_id)
        assert run.status in ('queued', 'running'), f'run ended early: {run.status}\n{run.error}'
        assert time.monotonic() < deadline, f'no metrics after {timeout} s'
        time.sleep(0.2)


@pytest.mark.slow
def test_cancel_stops_a_background_run(tmp_path, capsys):
    data = shared_file('data', 'cifar10-jpeg.tar.xz')
    db = tmp_path / 'runs.sqlite'
    argv = ['finetune', '--model', 'shufflenet_v2_x0_5', '--data-path', str(data), '--shots', '2']
    argv += [
        '--steps',
        '100000',
        '--batch-size',
        '8',
        '--eval-every',
        '0',
        '--eval-limit',
        '20',
        '--threads',
        '1',
    ]
    assert cli_main([*argv, '--name', 'long', '--db', str(db), '--background']) == 0
    run_id = int(capsys.readouterr().out.strip())
    store = RunStore(db)
    # a second run waits for the only slot, and is cancelled without ever starting a process
    queued = runner.launch(store, _long_run_config(data), max_active=1)
    assert store.get_run(queued).status == 'queued' and store.get_run(queued).launched is None
    assert runner.cancel(store, queued) == 'cancelled' and store.get_run(queued).pid is None

    _wait_for_metrics(store, run_id, 3)
    pid = store.get_run(run_id).pid
    assert store.get_run(run_id).status == 'running' and runner.pid_alive(pid)
    t0 = time.monotonic()
    assert cli_main(['runs', 'cancel', str(run_id), '--grace', '15', '--db', str(db)]) == 0
    took = time.monotonic() - t0
    assert capsys.readouterr().out.strip() == f'run {run_id}: cancelled'
    run = store.get_run(run_id)
    assert run.status == 'cancelled' and 'cancel requested' in run.error, run.error
    assert took < 15.0  # the flag is seen at the next step (about a second), before any SIGTERM
    assert not runner.pid_alive(pid)
    n = len(store.metrics(run_id, 'train/loss'))
    assert n >= 3 and run.summary['steps'] == n
    assert any(e['message'].startswith('cancelled') for e in store.events(run_id))
    store.close()


@pytest.mark.slow
def test_killed_run_ends_failed_with_its_metrics(tmp_path):
    data = shared_file('data', 'cifar10-jpeg.tar.xz')
    store = RunStore(tmp_path / 'runs.sqlite')
    run_id = runner.launch(store, _long_run_config(data), name='doomed')
    _wait_for_metrics(store, run_id, 6)
    pid = store.get_run(run_id).pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while store.get_run(run_id).status == 'running':
        runner.reconcile(store)
        assert time.monotonic() < deadline
        time.sleep(0.1)
    run = store.get_run(run_id)
    assert run.status == 'failed' and run.finished is not None
    assert f'process {pid} ended without finishing the run (killed by SIGKILL)' in run.error
    assert len(store.metrics(run_id, 'train/loss')) >= 5  # committed every few steps: kept
    assert not runner.pid_alive(pid)
    store.close()


@pytest.mark.slow
def test_cancel_escalates_to_sigterm(tmp_path):
    """With no grace period the process is terminated at once; it still ends cleanly as cancelled."""
    data = shared_file('data', 'cifar10-jpeg.tar.xz')
    store = RunStore(tmp_path / 'runs.sqlite')
    run_id = runner.launch(store, _long_run_config(data))
    _wait_for_metrics(store, run_id, 1)
    pid = store.get_run(run_id).pid
    assert runner.cancel(store, run_id, grace_s=0.0, term_grace_s=10.0) == 'cancelled'
    run = store.get_run(run_id)
    # the SIGTERM handler turns the signal into a clean stop (rarely, the flag is seen first)
    assert run.error == 'terminated by SIGTERM' or run.error.startswith('cancel requested'), run.error
    assert not runner.pid_alive(pid) and run.finished is not None
    assert len(store.metrics(run_id, 'train/loss')) >= 1
    store.close()
