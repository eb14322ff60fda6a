"""The prefix store on PostgreSQL, shared by any number of server replicas.

Selected by a URL: `PrefixStore("postgresql://user@host:5432/db", files_dir="/mnt/prefixes")`.
Queries come from store.py with `?` placeholders (rewritten to psycopg's `%s`). Connections are
pooled per store object (short-lived use, one thread at a time). Transactions run at READ
COMMITTED; what must not interleave takes an advisory lock for the transaction:

* uploads and deletions of the same content (a file named by its sha256): `lock_content`;
* schema migrations of replicas starting together: `lock_schema`.

A commit that changes prefixes sends NOTIFY on channel `prefixtune_store`; `wait_for_change`
LISTENs on its own connection, so a replica hears of a delete on another one within milliseconds.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import psycopg
from psycopg.rows import dict_row

from .store_errors import StoreError
from .store_sql import POSTGRES_SCHEMA_1, Backend, redact

CHANNEL = "prefixtune_store"
SCHEMA_LOCK = 0x70726566_6978  # 'prefix': one fixed advisory key for migrations


def _content_key(sha256: str) -> int:
    return int(sha256[:15], 16)  # 60 bits of the hash: fits a signed bigint; a collision only serializes


class _Conn:
    """A psycopg connection that takes the store's `?` placeholders."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    def execute(self, sql: str, params=()):
        return self.conn.execute(sql.replace("?", "%s"), params)


class PostgresBackend(Backend):
    schema_1 = POSTGRES_SCHEMA_1
    pushes_changes = True
    shared = True
    integrity_errors = (psycopg.errors.IntegrityError,)

    def __init__(self, url: str, max_idle: int = 16, connect_timeout: int = 10):
        self.url = url
        self.location = redact(url)
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self._idle: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        self._listener: psycopg.Connection | None = None
        try:
            self._give(self._new())  # fail now, with the URL in the message, if the server is unreachable
        except psycopg.OperationalError as e:

            raise StoreError(f"cannot connect to the PostgreSQL store {self.location}: {str(e).strip()}") from None

    def _new(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=self.connect_timeout)

    def _take(self) -> psycopg.Connection:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn
        return self._new()

    def _give(self, conn: psycopg.Connection) -> None:
        if conn.broken:  # the server went away: the idle ones are most likely dead too
            with self._lock:
                stale, self._idle = self._idle, []
            for c in stale + [conn]:
                c.close()
            return
        if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.close()
            return
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    @contextlib.contextmanager
    def connect(self) -> Iterator[_Conn]:
        conn = self._take()
        try:
            yield _Conn(conn)
        finally:
            self._give(conn)

    @contextlib.contextmanager
    def write(self) -> Iterator[_Conn]:
        with self.connect() as db, db.conn.transaction():
            yield db

    def lock_content(self, db: _Conn, sha256: str) -> None:
        db.execute("SELECT pg_advisory_xact_lock(?)", (_content_key(sha256),))

    def try_lock_content(self, db: _Conn, sha256: str) -> bool:
        return db.execute("SELECT pg_try_advisory_xact_lock(?) AS ok", (_content_key(sha256),)).fetchone()["ok"]

    def lock_schema(self, db: _Conn) -> None:
        db.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK,))

    def after_explicit_ids(self, db: _Conn) -> None:
        db.execute("SELECT setval(pg_get_serial_sequence('prefixes', 'id'), "
                   "(SELECT COALESCE(max(id), 0) + 1 FROM prefixes), false)")

    def notify(self, db: _Conn, payload: str) -> None:
        db.execute("SELECT pg_notify(?, ?)", (CHANNEL, payload))  # delivered when the transaction commits

    def wait_for_change(self, timeout: float) -> bool:
        """Only one thread may call this (the server's store watcher)."""
        try:
            if self._listener is None or self._listener.closed:
                self._listener = psycopg.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout)
                self._listener.execute(f"LISTEN {CHANNEL}")
                return True  # (re)connected: whatever happened while not listening was missed
            for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                return True
            return False
        except psycopg.OperationalError:
            if self._listener is not None:
                self._listener.close()
            self._listener = None
            threading.Event().wait(min(timeout, 1.0))  # the server is away: do not spin
            return True

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
