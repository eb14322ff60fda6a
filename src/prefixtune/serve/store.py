"""The prefix store: a SQLite file, or a PostgreSQL database shared by replicas, indexing prefix files and API keys.

    store = PrefixStore("prefixes.db", model=model)     # files live in prefixes-files/ beside it
    store = PrefixStore("postgresql://u@db/prefixes", files_dir="/mnt/prefixes")   # see store_pg.py
    key = store.add_key("alice")                         # shown once; only its sha256 is kept
    store.add("news", owner="alice", source="news.safetensors", public=False)
    record = store.get("news", owner="alice")            # own prefixes first, then public ones
    prefix = store.load(record)                          # sha256 re-checked, then validated

Every method uses its own short-lived connection, so one store object is safe to share between
threads, and several processes (servers and the CLI) may use the same store: SQLite's WAL mode lets
readers run while one writer writes. Files are copied into the store's folder with atomic writes
under their sha256 and are never modified afterwards. store_sql.py holds the backends, migrations
(run on open), the sweep of files left by a crash, and the locking rules.

Crash safety: a file is written to a locked temp file, then renamed into place and indexed in one
transaction holding its content's lock. Opening the store removes what a killed process left
(unlocked temp files, files no row uses) and says so in the log. The SQLite file is 0600 and the
files folder 0700.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import secrets
import sqlite3
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..prefix import MergedPrefix, parse_prefix

from ..files import PrefixFileError, read_file_bytes
from . import store_sql
from .store_errors import InvalidName, NotOwner, PrefixExists, PrefixIntegrityError, PrefixNotFound

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # no '/': names are URL path segments
OWNER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
KEY_ID_CHARS = 12  # how much of a key's sha256 identifies it in listings
TEMP_GRACE_S = 60.0  # the periodic sweep leaves temp files written within this long (an upload writes in seconds)


def is_database_url(location) -> bool:
    return isinstance(location, str) and location.split("://", 1)[0] in ("postgresql", "postgres")


def open_backend(location: str | Path, files_dir: str | Path | None = None) -> tuple[store_sql.Backend, Path]:
    """The backend for a store location: a postgresql:// URL, else a SQLite file path."""
    if is_database_url(location):
        from .store_pg import PostgresBackend  # imports psycopg: only for PostgreSQL stores

        # files_dir None: the folder recorded in the store when it was first opened (see migrate)
        return PostgresBackend(location), Path(files_dir) if files_dir is not None else None
    if isinstance(location, str) and "://" in location:
        raise ValueError(f"unknown store URL {store_sql.redact(location)!r}: use postgresql://user@host[:port]/database, "
                         "or a file path for SQLite")
    path = Path(location)
    return store_sql.SqliteBackend(path), Path(files_dir) if files_dir is not None else path.with_name(path.stem + "-files")


@dataclass(frozen=True)
class PrefixRecord:
    """One row of the index."""

    id: int
    name: str
    owner: str
    public: bool
    fingerprint: str
    base_model: str | None
    method: str | None
    length: int
    size_bytes: int
    sha256: str
    file: Path
    created: str

    def to_dict(self) -> dict:
        """The public description (no file path)."""
        d = asdict(self)
        d.pop("file")
        return d


@dataclass(frozen=True)
class KeyRecord:
    key_id: str  # the first characters of the key's sha256: enough to name it, useless to call with
    owner: str
    created: str


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


log = logging.getLogger("prefixtune.serve")


def _held_by_a_writer(path: Path) -> bool:
    """Whether a live process holds the lock on this temp file (a killed writer's lock is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True  # already renamed or removed by its writer
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _write_locked_temp(folder: Path, data: bytes) -> tuple[int, str]:
    """A temp file holding `data`, locked while its writer lives (so a sweep can tell it from a crash's)."""
    fd, tmp = tempfile.mkstemp(prefix=".add-", suffix=".tmp", dir=folder)  # mode 0600
    fcntl.flock(fd, fcntl.LOCK_EX)
    with os.fdopen(os.dup(fd), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return fd, tmp


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidName(f"invalid prefix name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    return name


def check_owner(owner: str) -> str:
    if not isinstance(owner, str) or not OWNER_PATTERN.match(owner):
        raise InvalidName(f"invalid owner {owner!r}: use 1-128 letters, digits, '.', '_', '@' or '-'")
    return owner


class PrefixStore:
    """Index of prefix files and API keys in one SQLite file or PostgreSQL database.

    `location`: a SQLite file path (files in `<stem>-files/` beside it unless `files_dir`), or a
    postgresql:// URL: then `files_dir` is a folder every replica reads and writes, recorded in the
    store on first open and the default afterwards. The schema is migrated on open, and files left without a row
    by a crash are swept. `model`: when given, files are validated against it on add and load
    (shapes and base-model fingerprint); without it only the file itself is checked (it must still
    name its base model).
    """

    def __init__(self, location: str | Path, model=None, max_file_bytes: int = 256 * 2**20,
                 files_dir: str | Path | None = None):
        self.backend, self.files_dir = open_backend(location, files_dir)
        self.path = getattr(self.backend, "path", None)  # the SQLite file; None on PostgreSQL
        self.model = model
        self.max_file_bytes = max_file_bytes
        self._on_remove: list[Callable[[PrefixRecord], None]] = []
        self._listeners_lock = threading.Lock()
        self.migrated = store_sql.migrate(self)  # (schema version found, version now); creates files_dir
        self._owner_only()
        self.removed_orphans = self._remove_orphans()

    def _owner_only(self) -> None:
        """The index holds key hashes and the files are users' prefixes: 0600 files, a 0700 folder."""
        os.chmod(self.files_dir, 0o700)
        if self.path is not None:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(f"{self.path}{suffix}", 0o600)

    def _remove_orphans(self) -> list[Path]:
        """Delete what a killed process left, saying so in the log: temp files no live writer holds,
        and store files no row uses (`store_sql.sweep`, which skips uploads still under way)."""
        removed = self._remove_stale_temp_files(min_age_s=0.0)
        for name in store_sql.sweep(self):
            removed.append(self.files_dir / name)
            log.warning("store %s: removed orphan %s (no row uses it) left by an interrupted add or remove",
                        self.backend.location, name)
        return removed

    def _remove_stale_temp_files(self, min_age_s: float) -> list[Path]:
        """Delete the `.add-*.tmp` files of writers that died: no live process holds the file's lock, and
        it was last written more than `min_age_s` ago (the periodic sweep waits TEMP_GRACE_S: that also
        covers a writer between creating its file and locking it, and locks another machine cannot see)."""
        removed = []
        now = time.time()
        for f in sorted(self.files_dir.glob(".add-*.tmp")):
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            age = now - st.st_mtime
            if age < min_age_s or _held_by_a_writer(f):
                continue
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
                removed.append(f)
                log.warning("store %s: removed orphan %s (%d bytes) left by an interrupted add",
                            self.backend.location, f.name, st.st_size)
        return removed

    def __repr__(self) -> str:
        return f"PrefixStore({self.backend.location!r})"

    # -- connections ---------------------------------------------------------------------------

    def _connect(self):
        return self.backend.connect()

    def _write(self):
        return self.backend.write()

    def _record(self, row: sqlite3.Row) -> PrefixRecord:
        return PrefixRecord(id=row["id"], name=row["name"], owner=row["owner"], public=bool(row["public"]),
                            fingerprint=row["fingerprint"], base_model=row["base_model"], method=row["method"],
                            length=row["length"], size_bytes=row["size_bytes"], sha256=row["sha256"],
                            file=self.files_dir / row["file"], created=row["created"])

    # -- prefixes ------------------------------------------------------------------------------

    def add(self, name: str, owner: str, source: str | Path, public: bool = False,
            notes: list[str] | None = None) -> PrefixRecord:
        """Validate the file at `source`, copy it into the store and index it. `notes` (if given)
        receives what the store corrected (e.g. metadata naming another base model)."""
        source = Path(source)
        if not source.is_file():
            raise PrefixFileError(f"{source}: no such file")
        if source.stat().st_size > self.max_file_bytes:
            raise PrefixFileError(f"{source}: {source.stat().st_size} bytes, more than the store's limit of "
                                  f"{self.max_file_bytes}")
        return self.add_bytes(name, owner, source.read_bytes(), public=public, label=str(source), notes=notes)

    def add_bytes(self, name: str, owner: str, data: bytes, public: bool = False,
                  label: str = "uploaded file", notes: list[str] | None = None) -> PrefixRecord:
        """Like `add`, for file contents in memory (an upload). `label` names the file in errors."""
        check_name(name)
        check_owner(owner)
        if len(data) > self.max_file_bytes:
            raise PrefixFileError(f"{label}: {len(data)} bytes, more than the store's limit of {self.max_file_bytes}")
        self._check_name_free(name, owner, public)  # cheap and clear, before the file work
        prefix = self._validate(data, label, notes)  # nothing is written for a refused file
        meta = prefix.meta
        sha256 = hashlib.sha256(data).hexdigest()
        file = self.files_dir / f"{sha256}.safetensors"  # by content: replicas never see half a file
        # the temp file stays locked while it is written: a store opened meanwhile knows it is no orphan
        fd, tmp = _write_locked_temp(self.files_dir, data)
        try:
            # The file is renamed into place inside the transaction, holding its content's lock, so
            # no delete of a row with the same content can remove it before our row commits.
            with self._write() as db:
                self.backend.lock_content(db, sha256)
                self._check_name_free(name, owner, public, db)
                os.replace(tmp, file)
                row = db.execute(
                    "INSERT INTO prefixes (name, owner, public, fingerprint, base_model, method, length, size_bytes,"
                    " sha256, file, created) VALUES (?,?,?,?,?,?,?,?,?,?,?) RETURNING *",
                    (name, owner, int(bool(public)), meta["fingerprint"], meta.get("base_model"), meta.get("method"),
                     prefix.length, len(data), sha256, file.name, _now())).fetchone()
                self.backend.notify(db, f"add {row['id']}")
        except self.backend.integrity_errors as e:  # a concurrent add took the name between our check and insert
            store_sql.drop_file_if_unused(self, file.name)
            raise PrefixExists(f"a prefix named {name!r} already exists") from e
        except BaseException:
            store_sql.drop_file_if_unused(self, file.name)
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.close(fd)  # releases the lock
        return self._record(row)

    def _check_name_free(self, name: str, owner: str, public: bool, db=None) -> None:
        with contextlib.nullcontext(db) if db is not None else self._connect() as conn:
            if conn.execute("SELECT 1 FROM prefixes WHERE owner=? AND name=?", (owner, name)).fetchone():
                raise PrefixExists(f"you already have a prefix named {name!r}; remove it first or pick another name")
            if public and conn.execute("SELECT 1 FROM prefixes WHERE public=1 AND name=?", (name,)).fetchone():
                raise PrefixExists(f"a public prefix named {name!r} already exists; pick another name")

    def _validate(self, data: bytes, label: str, notes: list[str] | None = None) -> MergedPrefix:
        prefix = parse_prefix(data, label, self.model)
        if prefix.is_infix:
            raise PrefixFileError(f"{label}: is an infix ([x; INFIX; y]); the server serves prefix, prompt-tuning and "
                                  "P-tuning artifacts (an infix needs each row's source/target boundary)")
        meta = prefix.meta
        if not meta.get("fingerprint"):
            raise PrefixFileError(f"{label}: does not record which base model it was made for (no fingerprint); "
                                  "save it with save_prefix(prefix, path, model=model)")
        if self.model is not None:
            # the fingerprint matched the model, so that model is the truthful base, whatever the metadata says
            from ..models import model_name

            truth = model_name(self.model)
            if meta.get("base_model") != truth:
                note = (f"{label}: its metadata names base model {meta.get('base_model')!r}, but its fingerprint "
                        f"{meta['fingerprint']} is that of {truth!r}; listed under {truth!r}")
                log.warning("%s", note)
                if notes is not None:
                    notes.append(note)
                meta["base_model"] = truth
        return prefix

    def get(self, name: str, owner: str) -> PrefixRecord:
        """The prefix `name` as `owner` sees it: their own first, else a public one.

        Another owner's private prefix raises PrefixNotFound, exactly like a name nobody uses.
        """
        with self._connect() as db:
            row = db.execute("SELECT * FROM prefixes WHERE name=? AND (owner=? OR public=1) "
                             "ORDER BY owner=? DESC LIMIT 1", (name, owner, owner)).fetchone()
        if row is None:
            raise PrefixNotFound(f"no prefix named {name!r}")
        return self._record(row)

    def list(self, owner: str | None = None) -> list[PrefixRecord]:
        """What `owner` may use (own + public, own shadowing a public one of the same name); None: everything."""
        with self._connect() as db:
            if owner is None:
                rows = db.execute("SELECT * FROM prefixes ORDER BY name, owner").fetchall()
                return [self._record(r) for r in rows]
            rows = db.execute("SELECT * FROM prefixes WHERE owner=? OR public=1 ORDER BY name, owner=? DESC",
                              (owner, owner)).fetchall()
        seen, out = set(), []
        for r in rows:
            if r["name"] not in seen:
                seen.add(r["name"])
                out.append(self._record(r))
        return out

    def get_by_id(self, record_id: int) -> PrefixRecord | None:
        """The record with this id, or None once it is removed (ids are never reused)."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM prefixes WHERE id=?", (record_id,)).fetchone()
        return self._record(row) if row else None

    def find(self, name: str) -> list[PrefixRecord]:
        """Every prefix called `name`, whoever owns it (an administrator's view, e.g. the CLI)."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM prefixes WHERE name=? ORDER BY owner", (name,)).fetchall()
        return [self._record(r) for r in rows]

    def remove(self, name: str, owner: str) -> PrefixRecord:
        """Remove `owner`'s prefix `name` (its row, then its file); it is never served again."""
        with self._write() as db:
            row = db.execute("SELECT * FROM prefixes WHERE name=? AND (owner=? OR public=1) "
                             "ORDER BY owner=? DESC LIMIT 1", (name, owner, owner)).fetchone()
            if row is None:
                raise PrefixNotFound(f"no prefix named {name!r}")
            if row["owner"] != owner:
                raise NotOwner(f"prefix {name!r} is public but belongs to another owner; only its owner can remove it")
            if db.execute("DELETE FROM prefixes WHERE id=?", (row["id"],)).rowcount == 0:
                raise PrefixNotFound(f"no prefix named {name!r}")  # another replica removed it just now
            self.backend.notify(db, f"remove {row['id']}")
        record = self._record(row)
        with self._listeners_lock:
            listeners = list(self._on_remove)
        for listener in listeners:  # before the file goes, so a load racing with us sees the removal
            listener(record)
        store_sql.drop_file_if_unused(self, row["file"])  # other rows may hold the same content
        return record

    def on_remove(self, listener: Callable[[PrefixRecord], None]) -> None:
        """Call `listener(record)` after each remove through this object (the server drops its cached copy)."""
        with self._listeners_lock:
            self._on_remove.append(listener)

    def load(self, record: PrefixRecord) -> MergedPrefix:
        """Read a stored prefix, refusing it unless its bytes still have the sha256 recorded on add."""
        try:
            data = read_file_bytes(record.file)  # one buffer; the parsed tensors are views of it (no copy)
        except FileNotFoundError:
            raise PrefixIntegrityError(f"prefix {record.name!r}: its file {record.file} is missing") from None
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise PrefixIntegrityError(f"prefix {record.name!r}: its file {record.file} changed since it was added "
                                       f"({len(data)} bytes now, sha256 differs); refusing to serve it")
        # parse the very bytes just hashed (never the path again): what is served is what was checked,
        # and the tensors own their memory, so a later change to the file cannot reach them
        return self._validate(data, f"prefix {record.name!r}")

    # -- API keys ------------------------------------------------------------------------------

    def add_key(self, owner: str) -> str:
        """A new random API key for `owner`. Returned once; the store keeps only its sha256."""
        check_owner(owner)
        key = "pt-" + secrets.token_urlsafe(32)
        with self._write() as db:
            db.execute("INSERT INTO api_keys (key_hash, owner, created) VALUES (?,?,?)", (_hash_key(key), owner, _now()))
        return key

    def owner_of(self, key: str) -> str | None:
        """The owner of an API key, or None for an unknown (or removed) key."""
        if not key:
            return None
        with self._connect() as db:
            row = db.execute("SELECT owner FROM api_keys WHERE key_hash=?", (_hash_key(key),)).fetchone()
        return row["owner"] if row else None

    def remove_key(self, key_or_id: str) -> bool:
        """Remove a key, given the key itself or its key_id from `list_keys`. False if there was none."""
        with self._write() as db:
            n = db.execute("DELETE FROM api_keys WHERE key_hash=?", (_hash_key(key_or_id),)).rowcount
            if n == 0 and re.fullmatch(r"[0-9a-f]{%d}" % KEY_ID_CHARS, key_or_id):
                n = db.execute("DELETE FROM api_keys WHERE key_hash LIKE ?", (key_or_id + "%",)).rowcount
        return n > 0

    def list_keys(self, owner: str | None = None) -> list[KeyRecord]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM api_keys WHERE owner=? ORDER BY created", (owner,)).fetchall() if owner \
                else db.execute("SELECT * FROM api_keys ORDER BY owner, created").fetchall()
        return [KeyRecord(key_id=r["key_hash"][:KEY_ID_CHARS], owner=r["owner"], created=r["created"]) for r in rows]

    # -- replicas --------------------------------------------------------------------------------

    def existing_ids(self, ids) -> set[int]:
        """Which of these prefix ids still exist (a replica's cache drops the others)."""
        ids = list(ids)
        if not ids:
            return set()
        with self._connect() as db:
            rows = db.execute(f"SELECT id FROM prefixes WHERE id IN ({','.join('?' * len(ids))})", ids).fetchall()
        return {r["id"] for r in rows}

    def wait_for_change(self, timeout: float) -> bool:
        """Block up to `timeout` s for a change made through another process (PostgreSQL: NOTIFY)."""
        return self.backend.wait_for_change(timeout)

    def sweep(self) -> list[str]:
        """Delete what crashed uploads left (the server runs this every `store_sweep_s`): files no row uses,
        and temp files no live writer holds that were last written over TEMP_GRACE_S ago (the age also
        covers a shared folder whose locks another machine cannot see); returns their names."""
        temps = [f.name for f in self._remove_stale_temp_files(min_age_s=TEMP_GRACE_S)]
        return temps + store_sql.sweep(self)

    def close(self) -> None:
        self.backend.close()
