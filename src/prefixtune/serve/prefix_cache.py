"""Loaded prefixes kept in memory (merged tensors only), least recently used dropped first."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from ..prefix import MergedPrefix
from .store import PrefixIntegrityError, PrefixNotFound, PrefixRecord, PrefixStore


@dataclass(eq=False)
class LoadedPrefix:
    """A prefix ready for the batcher. `revoked` is set when it is removed: requests that have not
    started yet are refused (rows already decoding finish)."""

    name: str
    prefix: MergedPrefix
    record_id: int | None = None
    revoked: bool = False


class PrefixCache:
    """`get(record)` returns the loaded prefix, reading the file (sha256-checked) only on a miss."""

    def __init__(self, store: PrefixStore, capacity: int = 64, dtype=None):
        self.store = store
        self.capacity = capacity
        self.dtype = dtype
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, LoadedPrefix] = OrderedDict()
        self._removed: set[int] = set()  # ids are never reused, so a removed id stays refused
        self._loading: dict[int, threading.Lock] = {}
        self.hits = 0
        self.misses = 0
        store.on_remove(lambda record: self.invalidate(record.id))

    def get(self, record: PrefixRecord) -> LoadedPrefix:
        with self._lock:
            entry = self._lookup(record.id)
            if entry is not None:
                return entry
            per_id = self._loading.setdefault(record.id, threading.Lock())
        with per_id:  # one load per prefix even when many requests miss at once
            with self._lock:
                entry = self._lookup(record.id)
                if entry is not None:
                    return entry
                self.misses += 1
            try:
                try:
                    merged = self.store.load(record)
                except PrefixIntegrityError:
                    if self.store.get_by_id(record.id) is None:  # removed (maybe by another process) meanwhile
                        raise PrefixNotFound(f"no prefix named {record.name!r}") from None
                    raise
                if self.dtype is not None:
                    merged = merged.to(dtype=self.dtype)
                entry = LoadedPrefix(name=record.name, prefix=merged, record_id=record.id)
                with self._lock:
                    if record.id in self._removed:  # removed while we were reading it
                        raise PrefixNotFound(f"no prefix named {record.name!r}")
                    self._entries[record.id] = entry
                    while len(self._entries) > self.capacity:
                        self._entries.popitem(last=False)
                return entry
            finally:
                with self._lock:
                    self._loading.pop(record.id, None)

    def _lookup(self, record_id: int) -> LoadedPrefix | None:
        if record_id in self._removed:
            raise PrefixNotFound("this prefix was removed")
        entry = self._entries.get(record_id)
        if entry is not None:
            self._entries.move_to_end(record_id)
            self.hits += 1
        return entry

    def invalidate(self, record_id: int) -> None:
        """Forget a removed prefix and revoke the copy that queued requests hold."""
        with self._lock:
            self._removed.add(record_id)
            entry = self._entries.pop(record_id, None)
        if entry is not None:
            entry.revoked = True

    def clear(self) -> None:
        """Drop every loaded copy (the next request reads its file again, sha256-checked)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
