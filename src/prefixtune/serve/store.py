"""The prefix store: one SQLite file indexing prefix files and API keys.

    store = PrefixStore("prefixes.db", model=model)     # files live in prefixes-files/ beside it
    key = store.add_key("alice")                         # shown once; only its sha256 is kept
    store.add("news", owner="alice", source="news.safetensors", public=False)
    record = store.get("news", owner="alice")            # own prefixes first, then public ones
    prefix = store.load(record)                          # sha256 re-checked, then validated

Every method opens its own short-lived connection, so one store object is safe to share between
threads, and several processes (the server and the CLI) may use the same file: WAL mode lets
readers run while one writer writes. Files are copied into the store's folder with atomic writes
under random names and are never modified afterwards.

Crash safety: a file is written to a locked temp file, then renamed into place and indexed in one
write transaction. Opening the store removes what a killed process left (unlocked temp files, files
with no row) and says so in the log. The database is created 0600 and the files folder 0700.
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
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..prefix import MergedPrefix, PrefixFileError, parse_prefix

log = logging.getLogger("prefixtune.serve")

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # no '/': names are URL path segments
OWNER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
KEY_ID_CHARS = 12  # how much of a key's sha256 identifies it in listings
SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS prefixes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids are never reused after a remove
    name        TEXT NOT NULL,
    owner       TEXT NOT NULL,
    public      INTEGER NOT NULL DEFAULT 0,
    fingerprint TEXT NOT NULL,
    base_model  TEXT,
    method      TEXT,
    length      INTEGER NOT NULL,
    size_bytes  INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    file        TEXT NOT NULL,
    created     TEXT NOT NULL,
    UNIQUE (owner, name)
);
-- one public prefix per name, so a public name always means one prefix
CREATE UNIQUE INDEX IF NOT EXISTS prefixes_public_name ON prefixes (name) WHERE public = 1;
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY,
    owner    TEXT NOT NULL,
    created  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StoreError(Exception):
    """Base class of the store's errors; the message is meant for the user."""


class PrefixNotFound(StoreError, LookupError):
    """No prefix of that name that this caller may see."""


class PrefixExists(StoreError):
    """The name is taken (by this owner, or by a public prefix)."""


class NotOwner(StoreError, PermissionError):
    """The caller may use this public prefix but not change it."""


class PrefixIntegrityError(StoreError):
    """A stored file is missing or changed since it was added; it is not served."""


class InvalidName(StoreError, ValueError):
    """A prefix name or owner that the store does not accept."""


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
    """Index of prefix files and API keys in one SQLite database.

    `model`: when given, files are validated against it on add and load (shapes and base-model
    fingerprint); without it only the file itself is checked (it must still name its base model).
    """

    def __init__(self, path: str | Path, model=None, max_file_bytes: int = 256 * 2**20):
        self.path = Path(path)
        self.files_dir = self.path.with_name(self.path.stem + "-files")
        self.model = model
        self.max_file_bytes = max_file_bytes
        self._on_remove: list[Callable[[PrefixRecord], None]] = []
        self._listeners_lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # owner-only: the index holds key hashes and the files are users' prefixes
        self.files_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.files_dir, 0o700)
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))  # SQLite gives -wal/-shm the same mode
        os.chmod(self.path, 0o600)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: readers never block the writer
            db.executescript(_SCHEMA)
            db.execute("INSERT OR IGNORE INTO store_meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            version = db.execute("SELECT value FROM store_meta WHERE key='schema_version'").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: store schema version {version}, this prefixtune reads {SCHEMA_VERSION}")
        for suffix in ("-wal", "-shm"):  # made by an older version, maybe with the umask's mode
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{self.path}{suffix}", 0o600)
        self.removed_orphans = self._remove_orphans()

    def __repr__(self) -> str:
        return f"PrefixStore({str(self.path)!r})"

    # -- connections ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)  # autocommit; writes use BEGIN
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout=10000")
            db.execute("PRAGMA synchronous=NORMAL")  # durable enough in WAL mode, much faster
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the write lock up front (no deadlock on upgrade)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _remove_orphans(self) -> list[Path]:
        """Delete what an interrupted add or remove left: temp files no live writer holds, and files
        no row names. Runs under the write lock, so no add can be between its rename and its insert."""
        removed = []
        with self._write() as db:
            indexed = {r["file"] for r in db.execute("SELECT file FROM prefixes")}
            for f in sorted(self.files_dir.iterdir()):
                if f.name.endswith(".tmp"):
                    if _held_by_a_writer(f):
                        continue
                elif not f.name.endswith(".safetensors") or f.name in indexed:
                    continue
                size = f.stat().st_size if f.exists() else 0
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
                    removed.append(f)
                    log.warning("store %s: removed orphan %s (%d bytes) left by an interrupted add or remove",
                                self.path, f.name, size)
        return removed

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
        file = self.files_dir / f"{uuid.uuid4().hex}.safetensors"
        # the temp file stays locked while we write it: a store opened meanwhile knows it is not an orphan
        fd, tmp = tempfile.mkstemp(prefix=".add-", suffix=".tmp", dir=self.files_dir)  # mode 0600
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with os.fdopen(os.dup(fd), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            with self._write() as db:  # rename + insert under the write lock: no orphan check sees half of it
                self._check_name_free(name, owner, public, db)
                os.replace(tmp, file)
                cur = db.execute(
                    "INSERT INTO prefixes (name, owner, public, fingerprint, base_model, method, length, size_bytes,"
                    " sha256, file, created) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (name, owner, int(bool(public)), meta["fingerprint"], meta.get("base_model"), meta.get("method"),
                     prefix.length, len(data), hashlib.sha256(data).hexdigest(), file.name, _now()))
                row = db.execute("SELECT * FROM prefixes WHERE id=?", (cur.lastrowid,)).fetchone()
        except sqlite3.IntegrityError as e:  # a concurrent add took the name between our check and insert
            file.unlink(missing_ok=True)
            raise PrefixExists(f"a prefix named {name!r} already exists") from e
        except BaseException:
            file.unlink(missing_ok=True)
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.close(fd)  # releases the lock
        return self._record(row)

    def _check_name_free(self, name: str, owner: str, public: bool, db: sqlite3.Connection | None = None) -> None:
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
            db.execute("DELETE FROM prefixes WHERE id=?", (row["id"],))
        record = self._record(row)
        with self._listeners_lock:
            listeners = list(self._on_remove)
        for listener in listeners:  # before the file goes, so a load racing with us sees the removal
            listener(record)
        record.file.unlink(missing_ok=True)
        return record

    def on_remove(self, listener: Callable[[PrefixRecord], None]) -> None:
        """Call `listener(record)` after each remove through this object (the server drops its cached copy)."""
        with self._listeners_lock:
            self._on_remove.append(listener)

    def load(self, record: PrefixRecord) -> MergedPrefix:
        """Read a stored prefix, refusing it unless its bytes still have the sha256 recorded on add."""
        try:
            data = record.file.read_bytes()
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
            db.execute("INSERT INTO api_keys VALUES (?,?,?)", (_hash_key(key), owner, _now()))
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
                n = db.execute("DELETE FROM api_keys WHERE substr(key_hash, 1, ?)=?",
                               (KEY_ID_CHARS, key_or_id)).rowcount
        return n > 0

    def list_keys(self, owner: str | None = None) -> list[KeyRecord]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM api_keys WHERE ? IS NULL OR owner=? ORDER BY owner, created",
                              (owner, owner)).fetchall()
        return [KeyRecord(key_id=r["key_hash"][:KEY_ID_CHARS], owner=r["owner"], created=r["created"]) for r in rows]
