"""Run store: runs, their metrics and events in one SQLite file.

One writer (the process executing a run) and any number of readers (the app polling, the CLI) share
the file safely: the database is in WAL mode, so readers never block the writer, and every connection
waits (busy timeout) instead of failing when another one holds the write lock. Metrics are buffered
and committed in small batches (every ``flush_every`` steps or ``flush_seconds``, whichever comes
first, and always on a status change), so a process that is killed loses at most the last few steps.

Typical use::

    store = RunStore()                           # $GHNVIZ_HOME/runs.sqlite or ~/.local/share/ghnviz/
    run_id = store.create_run({'kind': 'finetune', 'model': 'resnet18'}, name='r18')
    with store.track(run_id) as run:             # running -> done | failed | cancelled
        for step in range(100):
            if store.cancel_requested(run_id):
                raise RunCancelled()
            store.log_metrics(run_id, step, {'train/loss': 1.0})
        run.summary = {'test/acc': 42.0}
    store.metrics_frame(run_id)                  # pandas DataFrame (run_id, step, key, value, time)
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import sqlite3
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pandas is imported lazily by metrics_frame
    import pandas as pd

log = logging.getLogger(__name__)

STATUSES = ('queued', 'running', 'done', 'failed', 'cancelled')
ACTIVE = ('queued', 'running')
TERMINAL = ('done', 'failed', 'cancelled')

# One entry per schema version: entry i migrates user_version i to i + 1.
_MIGRATIONS: list[str] = [
    """
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'queued'
            CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
        created REAL NOT NULL,
        launched REAL,
        started REAL,
        finished REAL,
        config TEXT NOT NULL DEFAULT '{}',
        pid INTEGER,
        error TEXT,
        summary TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX runs_status ON runs (status);
    CREATE TABLE metrics (
        run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        step INTEGER NOT NULL,
        key TEXT NOT NULL,
        value REAL,
        time REAL NOT NULL
    );
    CREATE INDEX metrics_run_key_step ON metrics (run_id, key, step);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        time REAL NOT NULL,
        level TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX events_run ON events (run_id, time);
    """,
]
SCHEMA_VERSION = len(_MIGRATIONS)


class RunCancelled(Exception):
    """Raised inside a run when its cancel flag is seen (or the process is asked to terminate)."""


def default_db_path() -> Path:
    """Where runs are stored unless told otherwise.

    ``$GHNVIZ_HOME/runs.sqlite`` when GHNVIZ_HOME is set, else ``$XDG_DATA_HOME/ghnviz/runs.sqlite``,
    else ``~/.local/share/ghnviz/runs.sqlite``.
    """
    home = os.environ.get('GHNVIZ_HOME')
    if home:
        return Path(home).expanduser() / 'runs.sqlite'
    data = os.environ.get('XDG_DATA_HOME') or Path.home() / '.local' / 'share'
    return Path(data).expanduser() / 'ghnviz' / 'runs.sqlite'


@dataclass
class Run:
    """One row of the ``runs`` table, with its JSON columns decoded."""

    id: int
    name: str
    status: str
    created: float
    launched: float | None
    started: float | None
    finished: float | None
    config: dict[str, Any]
    pid: int | None
    error: str | None
    summary: dict[str, Any] | None
    cancel_requested: bool

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def seconds(self) -> float | None:
        """Wall time since the run started (until it finished), or None before it started."""
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started


@dataclass
class Tracking:
    """Handed out by :meth:`RunStore.track`; set ``summary`` before the block ends."""

    run_id: int
    summary: dict[str, Any] = field(default_factory=dict)
    status: str = 'running'  # the final status once the block has ended


def _json(obj: Any) -> str:
    return json.dumps(obj, default=str, sort_keys=True)


class RunStore:
    """Runs, metrics and events in a SQLite file (see the module docstring).

    Args:
        path: database file; created with its parent folder when absent. None: :func:`default_db_path`.
        busy_timeout: seconds a connection waits for another one's write lock before giving up.
        flush_every: metric steps buffered before a commit.
        flush_seconds: the longest time buffered metrics wait for a commit (checked on each log call).
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        busy_timeout: float = 30.0,
        flush_every: int = 5,
        flush_seconds: float = 1.0,
    ) -> None:
        self.path = Path(path) if path is not None else default_db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._lock = threading.RLock()
        self._pending: list[tuple[int, int, str, float | None, float]] = []
        self._pending_steps = 0
        self._last_flush = time.monotonic()
        self._conn = sqlite3.connect(
            str(self.path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute(f'PRAGMA busy_timeout = {int(busy_timeout * 1000)}')
        mode = self._conn.execute('PRAGMA journal_mode = WAL').fetchone()[0]
        if mode.lower() != 'wal':
            log.warning('%s: journal mode is %s, not WAL (concurrent readers may block)', self.path, mode)
        self._conn.execute('PRAGMA synchronous = NORMAL')
        self._conn.execute('PRAGMA foreign_keys = ON')
        self._migrate()

    # ------------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock up front (no deadlock between two writers)."""
        with self._lock:
            self._conn.execute('BEGIN IMMEDIATE')
            try:
                yield self._conn
            except BaseException:
                self._conn.execute('ROLLBACK')
                raise
            self._conn.execute('COMMIT')

    def _migrate(self) -> None:
        with self._write() as conn:
            version = conn.execute('PRAGMA user_version').fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f'{self.path} has schema version {version}, newer than this ghnviz ({SCHEMA_VERSION})'
                )
            for v in range(version, SCHEMA_VERSION):
                log.info('%s: migrating run store schema %d -> %d', self.path, v, v + 1)
                for statement in _MIGRATIONS[v].split(';'):
                    if statement.strip():
                        conn.execute(statement)
            if version != SCHEMA_VERSION:
                conn.execute(f'PRAGMA user_version = {SCHEMA_VERSION}')

    def journal_mode(self) -> str:
        with self._lock:
            return self._conn.execute('PRAGMA journal_mode').fetchone()[0]

    def close(self) -> None:
        """Commit what is buffered and close the connection."""
        with self._lock:
            self.flush()
            self._conn.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f'RunStore({str(self.path)!r})'

    # ------------------------------------------------------------------ runs
    def create_run(self, config: Mapping[str, Any], name: str | None = None, status: str = 'queued') -> int:
        """Add a run and return its id. ``name`` defaults to ``config['name']`` or ``run-<id>``.

        ``queued`` runs are for the background runner (:mod:`ghnviz.runner`), which starts them when a
        slot is free; a run executed in the creating process should be created ``running``.
        """
        if status not in STATUSES:
            raise ValueError(f'unknown status {status!r}; valid: {", ".join(STATUSES)}')
        name = name or config.get('name') or ''
        with self._write() as conn:
            cur = conn.execute(
                'INSERT INTO runs (name, status, created, config) VALUES (?, ?, ?, ?)',
                (name, status, time.time(), _json(dict(config))),
            )
            run_id = int(cur.lastrowid)
            if not name:
                conn.execute('UPDATE runs SET name = ? WHERE id = ?', (f'run-{run_id}', run_id))
        return run_id

    def get_run(self, run_id: int) -> Run:
        """The run ``run_id``; KeyError when there is none."""
        with self._lock:
            row = self._conn.execute('SELECT * FROM runs WHERE id = ?', (int(run_id),)).fetchone()
        if row is None:
            raise KeyError(f'no run with id {run_id} in {self.path}')
        return _to_run(row)

    def list_runs(self, status: str | Iterable[str] | None = None) -> list[Run]:
        """All runs, newest first, optionally only those with the given status(es)."""
        statuses = [status] if isinstance(status, str) else list(status or [])
        for s in statuses:
            if s not in STATUSES:
                raise ValueError(f'unknown status {s!r}; valid: {", ".join(STATUSES)}')
        sql = 'SELECT * FROM runs'
        if statuses:
            sql += f' WHERE status IN ({",".join("?" * len(statuses))})'
        with self._lock:
            rows = self._conn.execute(sql + ' ORDER BY id DESC', statuses).fetchall()
        return [_to_run(r) for r in rows]

    def set_status(
        self,
        run_id: int,
        status: str,
        *,
        error: str | None = None,
        summary: Mapping[str, Any] | None = None,
        pid: int | None = None,
        only_if: Iterable[str] | None = None,
    ) -> bool:
        """Change a run's status (and stamp started/finished). Returns False when nothing changed.

        Args:
            only_if: change only when the current status is one of these (an atomic compare-and-set,
                for example so a late writer never turns ``cancelled`` back into ``failed``).
        """
        if status not in STATUSES:
            raise ValueError(f'unknown status {status!r}; valid: {", ".join(STATUSES)}')
        self.flush()
        now = time.time()
        sets, args = ['status = ?'], [status]
        if status == 'running':
            sets.append('started = COALESCE(started, ?)')
            args.append(now)
        if status in TERMINAL:
            sets.append('finished = ?')
            args.append(now)
        for col, value in (('error', error), ('pid', pid)):
            if value is not None:
                sets.append(f'{col} = ?')
                args.append(value)
        if summary is not None:
            sets.append('summary = ?')
            args.append(_json(dict(summary)))
        sql = f'UPDATE runs SET {", ".join(sets)} WHERE id = ?'
        args.append(int(run_id))
        if only_if is not None:
            allowed = list(only_if)
            sql += f' AND status IN ({",".join("?" * len(allowed))})'
            args += allowed
        with self._write() as conn:
            changed = conn.execute(sql, args).rowcount > 0
        if changed:
            log.debug('run %s -> %s', run_id, status)
        return changed

    def update_run(self, run_id: int, **columns: Any) -> None:
        """Set plain columns (``pid``, ``launched``, ``name``, ``summary``, ``config``) of a run."""
        allowed = {'pid', 'launched', 'name', 'summary', 'config', 'error'}
        bad = set(columns) - allowed
        if bad:
            raise ValueError(f'cannot update {sorted(bad)}; allowed: {sorted(allowed)}')
        values = [_json(v) if k in ('summary', 'config') and v is not None else v for k, v in columns.items()]
        with self._write() as conn:
            conn.execute(
                f'UPDATE runs SET {", ".join(f"{k} = ?" for k in columns)} WHERE id = ?',
                [*values, int(run_id)],
            )

    def claim_slot(self, run_id: int, max_active: int) -> bool:
        """Atomically mark a queued, unlaunched run as launched if fewer than ``max_active`` are.

        A run counts as active when it is running or launched but not yet running.
        """
        with self._write() as conn:
            active = conn.execute(
                "SELECT COUNT(*) FROM runs WHERE status = 'running' OR "
                "(status = 'queued' AND launched IS NOT NULL)"
            ).fetchone()[0]
            if active >= max_active:
                return False
            cur = conn.execute(
                "UPDATE runs SET launched = ? WHERE id = ? AND status = 'queued' AND launched IS NULL",
                (time.time(), int(run_id)),
            )
            return cur.rowcount > 0

    def delete_run(self, run_id: int) -> None:
        """Remove a run with its metrics and events."""
        with self._write() as conn:
            conn.execute('DELETE FROM runs WHERE id = ?', (int(run_id),))

    # ------------------------------------------------------------------ cancel flag
    def request_cancel(self, run_id: int) -> None:
        """Raise the run's cancel flag; the process executing it checks the flag every step."""
        with self._write() as conn:
            conn.execute('UPDATE runs SET cancel_requested = 1 WHERE id = ?', (int(run_id),))

    def cancel_requested(self, run_id: int) -> bool:
        """Whether someone asked the run to stop."""
        with self._lock:
            row = self._conn.execute(
                'SELECT cancel_requested FROM runs WHERE id = ?', (int(run_id),)
            ).fetchone()
        return bool(row and row[0])

    # ------------------------------------------------------------------ metrics and events
    def log_metrics(self, run_id: int, step: int, values: Mapping[str, float | None]) -> None:
        """Record ``{key: value}`` at ``step``; committed every few steps (see the class docstring)."""
        now = time.time()
        with self._lock:
            for key, value in values.items():
                self._pending.append((int(run_id), int(step), str(key), _float(value), now))
            self._pending_steps += 1
            due = time.monotonic() - self._last_flush >= self.flush_seconds
            if self._pending_steps >= self.flush_every or due:
                self.flush()

    def flush(self) -> None:
        """Commit buffered metrics now."""
        with self._lock:
            if self._pending:
                rows, self._pending = self._pending, []
                with self._write() as conn:
                    conn.executemany(
                        'INSERT INTO metrics (run_id, step, key, value, time) VALUES (?,?,?,?,?)', rows
                    )
            self._pending_steps = 0
            self._last_flush = time.monotonic()

    def log_event(self, run_id: int, message: str, level: str = 'info') -> None:
        """Append a message to the run's event log (committed at once)."""
        with self._write() as conn:
            conn.execute(
                'INSERT INTO events (run_id, time, level, message) VALUES (?, ?, ?, ?)',
                (int(run_id), time.time(), level, str(message)),
            )

    def events(self, run_id: int) -> list[dict[str, Any]]:
        """The run's events, oldest first, as dicts (time, level, message)."""
        with self._lock:
            rows = self._conn.execute(
                'SELECT time, level, message FROM events WHERE run_id = ? ORDER BY id', (int(run_id),)
            ).fetchall()
        return [dict(r) for r in rows]

    def latest_metrics(self, run_id: int) -> dict[str, tuple[int, float | None]]:
        """``{key: (step, value)}`` for the last step logged under each key."""
        with self._lock:
            rows = self._conn.execute(
                'SELECT m.key, m.step, m.value FROM metrics m JOIN '
                '(SELECT key, MAX(step) AS step FROM metrics WHERE run_id = ? GROUP BY key) last '
                'ON m.key = last.key AND m.step = last.step WHERE m.run_id = ? ORDER BY m.key, m.time',
                (int(run_id), int(run_id)),
            ).fetchall()
        return {r['key']: (r['step'], r['value']) for r in rows}

    def _metric_rows(self, run_id: int, keys: Iterable[str] | None = None) -> list[tuple]:
        """(step, key, value, time) tuples of a run, ordered by step then insertion."""
        sql = 'SELECT step, key, value, time FROM metrics WHERE run_id = ?'
        args: list[Any] = [int(run_id)]
        if keys is not None:
            keys = [keys] if isinstance(keys, str) else list(keys)
            sql += f' AND key IN ({",".join("?" * len(keys))})'
            args += keys
        with self._lock:
            cur = self._conn.cursor()
            cur.row_factory = None  # plain tuples: several times faster than Row for long runs
            return cur.execute(sql + ' ORDER BY step, rowid', args).fetchall()

    def metrics(self, run_id: int, key: str | None = None) -> list[dict[str, Any]]:
        """Metric rows of a run (optionally one key), ordered by step: dicts step, key, value, time."""
        names = ('step', 'key', 'value', 'time')
        return [dict(zip(names, r)) for r in self._metric_rows(run_id, key)]

    def metrics_frame(
        self, run_id: int, wide: bool = False, keys: Iterable[str] | None = None
    ) -> pd.DataFrame:
        """The run's metrics as a DataFrame.

        Args:
            wide: False: long format, columns ``run_id, step, key, value, time``. True: one row per
                step, columns ``step`` and one per key (the last value logged for that step and key;
                NaN where a key was not logged at that step).
            keys: only these metric keys.
        """
        import pandas as pd

        frame = pd.DataFrame.from_records(
            self._metric_rows(run_id, keys), columns=['step', 'key', 'value', 'time'], coerce_float=True
        )
        frame['value'] = frame['value'].astype(float)
        frame.insert(0, 'run_id', int(run_id))
        if wide:
            last = frame.drop_duplicates(['step', 'key'], keep='last')
            frame = last.pivot(index='step', columns='key', values='value')
            frame.columns.name = None
            frame = frame.reset_index()
        return frame

    def export_csv(self, run_ids: Iterable[int] | None, path: str | os.PathLike) -> int:
        """Write the metrics of ``run_ids`` (None: every run) as long-format CSV; returns the row count.

        Columns: run_id, name, status, step, key, value, time.
        """
        ids = [r.id for r in self.list_runs()][::-1] if run_ids is None else [int(i) for i in run_ids]
        n = 0
        with open(path, 'w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(['run_id', 'name', 'status', 'step', 'key', 'value', 'time'])
            for run_id in ids:
                run = self.get_run(run_id)
                for row in self.metrics(run_id):
                    writer.writerow(
                        [run_id, run.name, run.status, row['step'], row['key'], row['value'], row['time']]
                    )
                    n += 1
        return n

    # ------------------------------------------------------------------ lifecycle helper
    @contextlib.contextmanager
    def track(self, run_id: int, pid: int | None = None) -> Iterator[Tracking]:
        """Mark the run running for the block, then done, cancelled or failed.

        :class:`RunCancelled` inside the block ends the run ``cancelled`` and is swallowed;
        KeyboardInterrupt ends it ``cancelled`` and propagates; any other exception ends it
        ``failed`` with the traceback as error text, and propagates.
        """
        tracking = Tracking(int(run_id))
        pid = pid if pid is not None else os.getpid()
        if not self.set_status(run_id, 'running', pid=pid, only_if=ACTIVE):
            raise RunCancelled(f'run {run_id} is already {self.get_run(run_id).status}')

        def finish(status: str, error: str | None = None) -> None:
            tracking.status = status
            self.set_status(run_id, status, error=error, summary=tracking.summary, only_if=ACTIVE)

        try:
            yield tracking
        except RunCancelled as exc:
            finish('cancelled', str(exc) or 'cancelled')
            self.log_event(run_id, f'cancelled: {exc}' if str(exc) else 'cancelled')
        except KeyboardInterrupt:
            finish('cancelled', 'interrupted')
            raise
        except BaseException as exc:
            finish('failed', ''.join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
            self.log_event(run_id, f'failed: {type(exc).__name__}: {exc}', level='error')
            raise
        else:
            finish('done')
        finally:
            self.flush()


def _float(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value.item() if hasattr(value, 'item') else value)
    return value


def _to_run(row: sqlite3.Row) -> Run:
    return Run(
        id=row['id'],
        name=row['name'],
        status=row['status'],
        created=row['created'],
        launched=row['launched'],
        started=row['started'],
        finished=row['finished'],
        config=json.loads(row['config'] or '{}'),
        pid=row['pid'],
        error=row['error'],
        summary=json.loads(row['summary']) if row['summary'] else None,
        cancel_requested=bool(row['cancel_requested']),
    )
