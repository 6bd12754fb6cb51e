"""The node's durable state: one SQLite file in the spool folder.

Every instance, series, job and outbound result is in exactly one state
(the state machines are in :mod:`node.spool`, :mod:`node.jobs` and
:mod:`node.sender`). WAL journal; ``synchronous=FULL`` (each commit on disk) for
jobs and outbound results. The spool's own connection uses ``synchronous=NORMAL``:
an instance is safe once its file and folder are fsynced, which happens before its
row is committed; a process crash loses no committed row (WAL), and the few rows a
power cut may lose are rebuilt from the files by :meth:`node.spool.DiskSpool.recover`
at start-up. Each thread or process opens its own :class:`StateDB`; a lock
serialises the threads that share one.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger(__name__)

DB_NAME = "state.db"
SCHEMA_VERSION = 4  # 2: notifications; 3: job and outbound priority and urgency;
#                    4: storage commitment requests

# Columns added after a version: (version, table, column, declaration). A state.db from an
# older version gets them at open (ALTER TABLE ADD COLUMN, so old rows keep their values and
# take the default); new files have them from _SCHEMA.
_ADDED_COLUMNS = (
    (3, "jobs", "priority_reason", "TEXT"),
    (3, "jobs", "urgent", "INTEGER NOT NULL DEFAULT 0"),
    (3, "outbound", "priority", "INTEGER NOT NULL DEFAULT 0"),
    (3, "outbound", "urgent", "INTEGER NOT NULL DEFAULT 0"),
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_uid);

-- receiving -> queued -> processing -> done | failed; a late instance sends a
-- finished series back to receiving (re-run).
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    series_dir TEXT NOT NULL,
    state TEXT NOT NULL,
    instance_count INTEGER NOT NULL DEFAULT 0,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    job_id INTEGER,
    runs INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    purged_at REAL
);
CREATE INDEX IF NOT EXISTS series_state ON series (state);

-- ready -> processing -> done | failed
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    series_dir TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    instance_count INTEGER NOT NULL,
    last_received_at REAL NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    worker_pid INTEGER,
    error TEXT,
    findings TEXT,
    priority_reason TEXT,
    urgent INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, priority, created_at);

-- queued -> sending -> sent | (queued again with backoff) | dead
CREATE TABLE IF NOT EXISTS outbound (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    study_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    files TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    created_at REAL NOT NULL,
    sent_at REAL,
    last_error TEXT,
    priority INTEGER NOT NULL DEFAULT 0,
    urgent INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbound_state ON outbound (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbound_study ON outbound (study_uid);

-- queued -> sending -> sent | (queued again with backoff) | dead (node.notify);
-- context: the DICOM header fields the messages need (PHI), NULL once scrubbed
CREATE TABLE IF NOT EXISTS notifications (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    uid TEXT NOT NULL UNIQUE,
    job_id INTEGER NOT NULL,
    study_uid TEXT NOT NULL,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    context TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    created_at REAL NOT NULL,
    sent_at REAL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS notifications_state ON notifications (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS notifications_study ON notifications (study_uid);

-- storage commitment requests (node.commitment): pending -> reported | dead
CREATE TABLE IF NOT EXISTS commitments (
    transaction_uid TEXT PRIMARY KEY,
    calling_ae TEXT NOT NULL,
    refs TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    created_at REAL NOT NULL,
    reported_at REAL,
    committed INTEGER,
    failed INTEGER,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS commitments_state ON commitments (state, next_attempt_at);
"""


def db_path(spool_dir: Path) -> Path:
    """Where the state database of *spool_dir* lives."""
    return Path(spool_dir) / DB_NAME


class StateDB:
    """A connection to the state database, safe to share between threads."""

    def __init__(self, spool_dir: Path, create: bool = True,
                 synchronous: str = "FULL") -> None:
        path = db_path(spool_dir)
        if not create and not path.exists():
            raise FileNotFoundError(f"no node state at {path} (has the node run with this spool?)")
        self.path = path
        if create:
            # Owner-only before SQLite creates it; its -wal and -shm files copy its mode. Never
            # open and close an existing database file here: closing any descriptor of it
            # drops every POSIX lock this process holds on it, those of its other SQLite
            # connections included, and another process then rebuilds the WAL index under
            # them (https://www.sqlite.org/howtocorrupt.html, section 2.2).
            try:
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass  # it exists: SQLite opens it; only its mode is checked below
            if path.stat().st_mode & 0o777 != 0o600:
                path.chmod(0o600)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None,
                                     check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._migrate()  # also with create=False: an older file gets the new tables

    def _migrate(self) -> None:
        """Create missing tables and add missing columns (every schema change so far only
        adds tables, indexes and columns, so ``CREATE ... IF NOT EXISTS`` and ``ALTER TABLE
        ADD COLUMN`` are the migration) and record the schema version; refuse a database
        written by a newer node."""
        has_meta = self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'"
                                      " AND name = 'meta'").fetchone()
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                                 ).fetchone() if has_meta else None
        found = int(row["value"]) if row else 0
        if found > SCHEMA_VERSION:
            self._conn.close()
            raise RuntimeError(f"{self.path} has schema version {found}, newer than this "
                               f"node's {SCHEMA_VERSION}: upgrade ich-node")
        self._conn.executescript(_SCHEMA)
        added = []
        with self.transaction() as cur:
            for _, table, column, declaration in _ADDED_COLUMNS:
                columns = {r["name"] for r in cur.execute(f"PRAGMA table_info({table})")}
                if column not in columns:
                    cur.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
                    added.append(f"{table}.{column}")
            cur.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
                        " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
                        " WHERE CAST(value AS INTEGER) < CAST(excluded.value AS INTEGER)",
                        (str(SCHEMA_VERSION),))
        if row is not None and found < SCHEMA_VERSION:
            LOGGER.info("state database %s migrated from schema %d to %d (added columns: %s)",
                        self.path, found, SCHEMA_VERSION, ", ".join(added) or "none")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """An immediate (write-locked) transaction; commits on success, rolls back on error."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Run a read-only query and return all rows."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def count_by_state(self, table: str, states: tuple[str, ...]) -> dict[str, int]:
        """Rows of *table* (series, jobs, outbound or notifications) per state, every state listed."""
        if table not in ("series", "jobs", "outbound", "notifications"):
            raise ValueError(f"no state column in table {table!r}")
        counts = dict.fromkeys(states, 0)
        counts.update({r["state"]: r["n"] for r in self.query(
            f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")})
        return counts

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()


def now() -> float:
    """Wall-clock time in seconds (state timestamps survive restarts)."""
    return time.time()


class RetryQueueTable:
    """The delivery bookkeeping that the outbound queue and the notification queue share:
    rows in *table* go ``queued -> sending -> sent``; a failed attempt goes back to
    ``queued`` with an exponential backoff, and to ``dead`` after ``max_attempts``."""

    table: str  # set by each subclass; never from input

    def __init__(self, db: StateDB, max_attempts: int, backoff_initial_s: float,
                 backoff_max_s: float) -> None:
        self.db = db
        self.max_attempts = max_attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s

    def mark_sent(self, item_id: int) -> None:
        """The peer took the item."""
        with self.db.transaction() as cur:
            cur.execute(f"UPDATE {self.table} SET state = 'sent', sent_at = ?,"
                        " attempts = attempts + 1, last_error = NULL WHERE id = ?",
                        (now(), item_id))

    def mark_failed(self, item_id: int, error: str) -> str:
        """Record a failed attempt; back off exponentially, dead after the cap. Returns the
        new state (queued or dead)."""
        with self.db.transaction() as cur:
            row = cur.execute(f"SELECT attempts FROM {self.table} WHERE id = ?",
                              (item_id,)).fetchone()
            attempts = row["attempts"] + 1
            if attempts >= self.max_attempts:
                state, next_at = "dead", now()
            else:
                delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempts - 1))
                state, next_at = "queued", now() + delay
            cur.execute(f"UPDATE {self.table} SET state = ?, attempts = ?, next_attempt_at = ?,"
                        " last_error = ? WHERE id = ?",
                        (state, attempts, next_at, error, item_id))
        return state

    def requeue_interrupted(self) -> int:
        """Start-up: rows left ``sending`` by a crash are sent again (same id)."""
        with self.db.transaction() as cur:
            cur.execute(f"UPDATE {self.table} SET state = 'queued' WHERE state = 'sending'")
            return cur.rowcount
