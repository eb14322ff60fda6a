"""Loaded prefixes kept in memory (merged tensors only), least recently used dropped first.

Bounded in count (`capacity`) and in bytes (`max_bytes`). A loaded prefix costs its tensors' bytes,
about its file size: the file is read into one buffer and the tensors are views of it (no copy is
made to parse it, and none is kept). At most `parallel_loads` files are read at a time, so a burst
of requests for uncached prefixes holds at most that many files being read and hashed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from ..prefix import MergedPrefix
from .store import PrefixRecord, PrefixStore
from .store_errors import PrefixIntegrityError, PrefixNotFound

log = logging.getLogger("prefixtune.serve")


@dataclass(eq=False)
class LoadedPrefix:
    """A prefix ready for the batcher. `revoked` is set when it is removed: requests that have not
    started yet are refused (rows already decoding finish)."""

    name: str
    prefix: MergedPrefix
    record_id: int | None = None
    revoked: bool = False
    sha256: str | None = None
    nbytes: int = 0  # what its tensors hold in memory


def prefix_nbytes(prefix: MergedPrefix) -> int:
    """Bytes of a prefix's tensors (views of one file buffer share it: counted once each)."""
    tensors = list(prefix.kv.values()) + ([prefix.embeds] if prefix.embeds is not None else [])
    return sum(t.numel() * t.element_size() for t in tensors)


class PrefixCache:
    """`get(record)` returns the loaded prefix, reading the file (sha256-checked) only on a miss."""

    def __init__(self, store: PrefixStore, capacity: int = 64, dtype=None, max_bytes: int | None = None,
                 parallel_loads: int = 2):
        self.store = store
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.dtype = dtype
        self.nbytes = 0  # held by the cached entries
        self._load_slots = threading.BoundedSemaphore(parallel_loads)
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, LoadedPrefix] = OrderedDict()
        self._removed: set[int] = set()  # ids are never reused, so a removed id stays refused
        self._loading: dict[int, threading.Lock] = {}
        self.hits = 0
        self.misses = 0
        store.on_remove(lambda record: self.invalidate(record.id))

    def get(self, record: PrefixRecord) -> LoadedPrefix:
        with self._lock:
            entry = self._lookup(record.id, record.sha256)
            if entry is not None:
                return entry
            per_id = self._loading.setdefault(record.id, threading.Lock())
        with per_id:  # one load per prefix even when many requests miss at once
            with self._lock:
                entry = self._lookup(record.id, record.sha256)
                if entry is not None:
                    return entry
                self.misses += 1
            try:
                try:
                    with self._load_slots:
                        merged = self.store.load(record)
                except PrefixIntegrityError:
                    if self.store.get_by_id(record.id) is None:  # removed (maybe by another process) meanwhile
                        raise PrefixNotFound(f"no prefix named {record.name!r}") from None
                    raise
                if self.dtype is not None:
                    merged = merged.to(dtype=self.dtype)
                entry = LoadedPrefix(name=record.name, prefix=merged, record_id=record.id, sha256=record.sha256,
                                     nbytes=prefix_nbytes(merged))
                with self._lock:
                    if record.id in self._removed:  # removed while we were reading it
                        raise PrefixNotFound(f"no prefix named {record.name!r}")
                    if self.max_bytes is not None and entry.nbytes > self.max_bytes:
                        log.warning("prefix %r (%d bytes) is larger than the prefix cache (%d bytes): served "
                                    "without being kept", record.name, entry.nbytes, self.max_bytes)
                        return entry  # served to this request only; it leaves memory with it
                    self._entries[record.id] = entry
                    self.nbytes += entry.nbytes
                    while len(self._entries) > self.capacity or (
                            self.max_bytes is not None and self.nbytes > self.max_bytes):
                        self._drop_entry(next(iter(self._entries)))
                return entry
            finally:
                with self._lock:
                    self._loading.pop(record.id, None)

    def _lookup(self, record_id: int, sha256: str) -> LoadedPrefix | None:
        if record_id in self._removed:
            raise PrefixNotFound("this prefix was removed")
        entry = self._entries.get(record_id)
        if entry is not None and entry.sha256 != sha256:  # the content changed under this id (a store copied over)
            self._drop_entry(record_id)
            entry.revoked = True
            entry = None
        if entry is not None:
            self._entries.move_to_end(record_id)
            self.hits += 1
        return entry

    def _drop_entry(self, record_id: int) -> LoadedPrefix | None:
        """Remove one entry (the caller holds the lock)."""
        entry = self._entries.pop(record_id, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
        return entry

    def invalidate(self, record_id: int) -> None:
        """Forget a removed prefix and revoke the copy that queued requests hold."""
        with self._lock:
            self._removed.add(record_id)
            entry = self._drop_entry(record_id)
        if entry is not None:
            entry.revoked = True

    def clear(self) -> None:
        """Drop every loaded copy (the next request reads its file again, sha256-checked)."""
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def resync(self) -> list[int]:
        """Invalidate cached prefixes removed through another process or replica; returns their ids."""
        with self._lock:
            cached = list(self._entries)
        gone = sorted(set(cached) - self.store.existing_ids(cached))
        for record_id in gone:
            self.invalidate(record_id)
        return gone

    def __len__(self) -> int:
        return len(self._entries)


def watch_store(store: PrefixStore, cache: PrefixCache, stop: threading.Event, poll_s: float = 5.0,
                sweep_s: float = 300.0) -> None:
    """Keep `cache` in step with changes made by other replicas and processes, until `stop` is set.

    PostgreSQL pushes each commit that changes prefixes (NOTIFY): the cache is re-checked at once.
    Without a push (SQLite, or a lost listener connection) it is re-checked every `poll_s`. Every
    `sweep_s` the store's files folder is swept of files a crashed upload left without a row.
    Runs in its own thread (run_server starts it); errors are logged, and it carries on.
    """
    pushes = store.backend.pushes_changes
    last_sync, next_sweep = 0.0, time.monotonic() + sweep_s
    while not stop.is_set():
        try:
            tick = min(1.0, poll_s)  # short waits: shutdown need not wait for a long poll
            changed = store.wait_for_change(tick) if pushes else (stop.wait(tick) and False)
            now = time.monotonic()
            if changed or now - last_sync >= poll_s:
                last_sync = now
                gone = cache.resync()
                if gone:
                    log.info("dropped cached prefixes %s: removed through another replica or process", gone)
            if now >= next_sweep:
                next_sweep = now + sweep_s
                swept = store.sweep()
                if swept:
                    log.warning("deleted %d store files left without a row by an interrupted upload: %s",
                                len(swept), swept)
        except Exception as e:  # the database may be restarting: keep serving, try again shortly
            log.warning("store watcher: %s", e)
            stop.wait(1.0)
