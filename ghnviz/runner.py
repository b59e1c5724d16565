"""Background runner: executes stored runs in separate, detached processes.

:func:`launch` stores a run as ``queued`` and starts it when a slot is free (at most ``max_active``
runs at once, :func:`default_max_active`). Each run executes in its own Python process,
``python -m ghnviz.cli_runs runs execute --db DB --id ID``, started in a new session, so it outlives
the process that launched it (a Streamlit rerun or reload, a CLI call) and never runs in the caller's
thread. Its standard output and error go to ``<db folder>/logs/run-<id>.log``. When a run ends, its
process starts the next queued run.

Cancelling is cooperative first: :func:`cancel` raises the run's cancel flag, which the run checks
every step; if the run has not stopped after ``grace_s`` seconds its process group gets SIGTERM
(turned into a clean ``cancelled`` ending by :func:`execute`), then SIGKILL. A run whose process
disappears without finishing (SIGKILL, out of memory, a crash of the interpreter) is found by
:func:`reconcile`, which readers call when they poll: it ends ``failed`` with a clear error text,
and the metrics it had committed stay in the store.

Jobs are named in :data:`JOBS` (``config['kind']`` -> ``'module:function'``); a job function takes
``(config: dict, store: RunStore, run_id: int)`` and drives the run's status with
:meth:`RunStore.track`.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ghnviz.runs import ACTIVE, TERMINAL, RunCancelled, RunStore

log = logging.getLogger(__name__)

# job kind -> 'module:function' executing a run of that kind
JOBS: dict[str, str] = {
    'finetune': 'ghnviz.finetune:execute_run',
}

# A run that was given a slot but whose process never reported a pid within this many seconds
# (the launching process died in between) is considered lost.
LAUNCH_TIMEOUT_S = 60.0
# A process holding a run's pid that started more than this many seconds after the run was launched
# (or started, for runs executed in the foreground) is another process reusing the pid.
PID_SLACK_S = 30.0

# Children started by this process, so that reconcile() can reap them (a killed child stays a
# zombie, which still answers kill(pid, 0), until its parent waits for it).
_CHILDREN: dict[int, subprocess.Popen] = {}
_CHILDREN_LOCK = threading.Lock()


def register_job(kind: str, target: str) -> None:
    """Make ``config['kind'] == kind`` runs execute ``target`` (``'module:function'``)."""
    if ':' not in target:
        raise ValueError(f'job target must look like "module:function", got {target!r}')
    JOBS[kind] = target


def resolve_job(kind: str) -> Callable[[dict, RunStore, int], Any]:
    """The function executing runs of ``kind``; ValueError listing valid kinds when unknown."""
    if kind not in JOBS:
        raise ValueError(f'unknown run kind {kind!r}; valid kinds: {", ".join(sorted(JOBS))}')
    module, func = JOBS[kind].split(':')
    return getattr(importlib.import_module(module), func)


def default_max_active() -> int:
    """``$GHNVIZ_MAX_RUNS`` if set, else half the CPU cores (1 on a 2-core machine)."""
    env = os.environ.get('GHNVIZ_MAX_RUNS')
    if env:
        return max(1, int(env))
    return max(1, (os.cpu_count() or 2) // 2)


def log_path(db_path: str | os.PathLike, run_id: int) -> Path:
    """Where the process executing ``run_id`` writes its standard output and error."""
    return Path(db_path).parent / 'logs' / f'run-{int(run_id)}.log'


def process_start_time(pid: int) -> float | None:
    """Unix time at which process ``pid`` started (Linux procfs); None when unknown."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            ticks = int(f.read().rsplit(')', 1)[1].split()[19])  # field 22: start time in clock ticks
        with open('/proc/stat') as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith('btime '))
        return boot + ticks / os.sysconf('SC_CLK_TCK')
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def pid_alive(pid: int | None, started_before: float | None = None) -> bool:
    """Whether a process with this pid exists and is not a zombie.

    Args:
        started_before: when given (Unix time), a process that started later is a different process
            that reuses the pid (after a reboot, for example), so it does not count.
    """
    if pid is None or pid <= 0:
        return False
    if os.name != 'posix':  # no harmless liveness probe here (kill(pid, 0) would terminate it)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    except OSError:
        return False
    try:
        with open(f'/proc/{pid}/stat') as f:
            state = f.read().rsplit(')', 1)[1].split()[0]
        if state in ('Z', 'X'):
            return False
    except (OSError, IndexError):  # no procfs (macOS): trust kill(pid, 0)
        return True
    if started_before is not None:
        start = process_start_time(pid)
        if start is not None and start > started_before:
            return False
    return True


def _reap_children() -> dict[int, int]:
    """Wait for finished children of this process; returns {run_id: exit code} of those reaped."""
    ended = {}
    with _CHILDREN_LOCK:
        for run_id, proc in list(_CHILDREN.items()):
            code = proc.poll()
            if code is not None:
                ended[run_id] = code
                del _CHILDREN[run_id]
    return ended


def _spawn(db_path: Path, run_id: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        '-m',
        'ghnviz.cli_runs',
        'runs',
        'execute',
        '--db',
        str(db_path),
        '--id',
        str(run_id),
    ]
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[1])  # so the child imports this very ghnviz
    env['PYTHONPATH'] = os.pathsep.join(p for p in (pkg_root, env.get('PYTHONPATH')) if p)
    env.setdefault('PYTHONUNBUFFERED', '1')
    out_path = log_path(db_path, run_id)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if os.name == 'posix':
        kwargs['start_new_session'] = True  # own session and process group: survives the launcher
    else:
        kwargs['creationflags'] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.DETACHED_PROCESS
    with open(out_path, 'ab') as out:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            close_fds=True,
            **kwargs,
        )


def start_queued(store: RunStore, max_active: int | None = None) -> list[int]:
    """Start queued runs, oldest first, while fewer than ``max_active`` are active; returns their ids."""
    max_active = max_active or default_max_active()
    started = []
    for run in sorted(store.list_runs('queued'), key=lambda r: r.id):
        if run.launched is not None:
            continue
        if run.cancel_requested:
            store.set_status(run.id, 'cancelled', error='cancelled before it started', only_if=('queued',))
            continue
        if not store.claim_slot(run.id, max_active):
            break
        try:
            proc = _spawn(store.path, run.id)
        except OSError as exc:
            store.set_status(
                run.id, 'failed', error=f'could not start the run process: {exc}', only_if=ACTIVE
            )
            continue
        with _CHILDREN_LOCK:
            _CHILDREN[run.id] = proc
        store.update_run(run.id, pid=proc.pid)
        store.log_event(run.id, f'started process {proc.pid}')
        log.info('run %d: started process %d', run.id, proc.pid)
        started.append(run.id)
    return started


def launch(
    store: RunStore, config: Mapping[str, Any], name: str | None = None, max_active: int | None = None
) -> int:
    """Store a run (``config['kind']``, default ``'finetune'``) and start it when a slot is free.

    Returns:
        The run id; the run is ``queued`` until its process reports ``running``.
    """
    config = dict(config)
    config.setdefault('kind', 'finetune')
    if config['kind'] not in JOBS:
        raise ValueError(f'unknown run kind {config["kind"]!r}; valid kinds: {", ".join(sorted(JOBS))}')
    run_id = store.create_run(config, name=name)
    store.log_event(run_id, 'queued')
    reconcile(store, max_active=max_active)
    return run_id


def _signal_name(code: int | None) -> str:
    if code is None:
        return 'unknown exit status'
    if code < 0:
        try:
            return f'killed by {signal.Signals(-code).name}'
        except ValueError:
            return f'killed by signal {-code}'
    return f'exit code {code}'


def _log_tail(path: Path, n: int = 20) -> str:
    try:
        lines = path.read_text(errors='replace').splitlines()
    except OSError:
        return ''
    return '\n'.join(lines[-n:])


def reconcile(store: RunStore, max_active: int | None = None, start: bool = True) -> list[int]:
    """Settle runs whose process is gone, then start queued runs (when ``start``).

    An active run whose pid no longer exists ends ``failed`` (``cancelled`` when a cancel had been
    requested), with an error text naming the process and the tail of its log. Call it whenever the
    store is polled.

    Returns:
        Ids of the runs it settled.
    """
    exit_codes = _reap_children()
    settled = []
    now = time.time()
    for run in store.list_runs(ACTIVE):
        lost_launch = run.pid is None and run.launched is not None and now - run.launched > LAUNCH_TIMEOUT_S
        # the run's process started before it was launched / reported running (plus clock slack)
        owner_start = (run.launched or run.started or run.created) + PID_SLACK_S
        if not lost_launch and (run.pid is None or pid_alive(run.pid, started_before=owner_start)):
            continue
        with _CHILDREN_LOCK:  # a child of ours that ended since _reap_children ran
            proc = _CHILDREN.pop(run.id, None)
        code = exit_codes.get(run.id, proc.wait() if proc is not None else None)
        if lost_launch:
            error = 'the run was given a slot but its process never started'
        else:
            how = _signal_name(code) if (run.id in exit_codes or proc is not None) else 'killed or crashed'
            error = f'process {run.pid} ended without finishing the run ({how})'
        tail = _log_tail(log_path(store.path, run.id))
        if tail:
            error += f'\n--- last lines of {log_path(store.path, run.id)} ---\n{tail}'
        status = 'cancelled' if run.cancel_requested else 'failed'
        if store.set_status(run.id, status, error=error, only_if=ACTIVE):
            store.log_event(run.id, error.splitlines()[0], level='error' if status == 'failed' else 'info')
            log.warning('run %d: %s', run.id, error.splitlines()[0])
            settled.append(run.id)
    if start:
        start_queued(store, max_active)
    return settled


def _stop_process(pid: int, sig: int) -> None:
    if pid == os.getpid():
        return  # a run executing in this very process stops through its cancel flag only
    try:
        if os.name == 'posix' and os.getpgid(pid) == pid:
            os.killpg(pid, sig)  # the run's own process group (started by _spawn)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_stopped(store: RunStore, run_id: int, pid: int | None, timeout: float) -> bool:
    """Wait until the run's process is gone (or, without a pid of another process, the run ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap_children()
        if pid is not None and pid != os.getpid():
            if not pid_alive(pid):
                return True
        elif store.get_run(run_id).status in TERMINAL:
            return True
        time.sleep(0.05)
    return False


def _escalate(store: RunStore, run_id: int, grace_s: float, term_grace_s: float) -> str:
    pid = store.get_run(run_id).pid
    if not _wait_stopped(store, run_id, pid, grace_s) and pid is not None:
        log.info('run %d: no stop after %.1f s, sending SIGTERM to %d', run_id, grace_s, pid)
        _stop_process(pid, signal.SIGTERM)
        if not _wait_stopped(store, run_id, pid, term_grace_s):
            log.warning('run %d: still alive, sending SIGKILL to %d', run_id, pid)
            _stop_process(pid, signal.SIGKILL)
            _wait_stopped(store, run_id, pid, term_grace_s)
    if store.set_status(run_id, 'cancelled', error='cancelled (process stopped)', only_if=ACTIVE):
        store.log_event(run_id, 'cancelled (process stopped)')
    reconcile(store)
    return store.get_run(run_id).status


def cancel(
    store: RunStore, run_id: int, grace_s: float = 5.0, term_grace_s: float = 3.0, wait: bool = True
) -> str:
    """Stop a run: cancel flag, then SIGTERM after ``grace_s``, then SIGKILL after ``term_grace_s``.

    Args:
        wait: block until the run has stopped; False escalates in a daemon thread and returns at once.

    Returns:
        The run's status (``cancelled`` once stopped; a run that had already ended keeps its status).
    """
    run = store.get_run(run_id)
    if run.status in TERMINAL:
        return run.status
    store.request_cancel(run_id)
    store.log_event(run_id, 'cancel requested')
    if run.status == 'queued' and run.launched is None:
        if store.set_status(run_id, 'cancelled', error='cancelled before it started', only_if=('queued',)):
            return 'cancelled'
    if not wait:
        threading.Thread(target=_escalate, args=(store, run_id, grace_s, term_grace_s), daemon=True).start()
        return store.get_run(run_id).status
    return _escalate(store, run_id, grace_s, term_grace_s)


def wait(store: RunStore, run_id: int, timeout: float | None = None, poll_s: float = 0.2) -> str:
    """Block until the run ends (reconciling on every poll); returns its final status.

    Raises:
        TimeoutError: when ``timeout`` seconds pass first.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        reconcile(store)
        status = store.get_run(run_id).status
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f'run {run_id} still {status} after {timeout} s')
        time.sleep(poll_s)


def execute(db_path: str | os.PathLike, run_id: int) -> int:
    """Execute a stored run in this process (what the runner's child process calls); exit code."""
    store = RunStore(db_path)

    def on_sigterm(signum, frame):
        raise RunCancelled('terminated by SIGTERM')

    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        signal.signal(signal.SIGTERM, on_sigterm)
    code = 0
    try:
        try:
            run = store.get_run(run_id)
            job = resolve_job(run.config.get('kind', 'finetune'))
            job(run.config, store, run_id)
        except RunCancelled as exc:
            store.set_status(run_id, 'cancelled', error=str(exc) or 'cancelled', only_if=ACTIVE)
        except BaseException as exc:  # noqa: BLE001 - anything that escaped the job ends the run failed
            text = ''.join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            store.set_status(run_id, 'failed', error=text, only_if=ACTIVE)
            code = 1
    except RunCancelled:  # SIGTERM while the outcome was being recorded
        store.set_status(run_id, 'cancelled', error='terminated by SIGTERM', only_if=ACTIVE)
    finally:
        if main_thread:  # let the clean-up (last commit, starting the next queued run) finish
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            store.flush()
            start_queued(store)
        finally:
            store.close()
            if main_thread:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return code
