"""Serving many users' prefixes from one frozen model (issue #4).

    store.py         index of prefix files and API keys (PrefixStore), on SQLite or PostgreSQL
    store_sql.py     the backends' common part: schema, migrations, locks, crash sweep, copy
    store_pg.py      the PostgreSQL backend, shared by replicas (LISTEN/NOTIFY)
    prefix_cache.py  loaded prefixes in memory, LRU, revoked on remove (PrefixCache)
    sampling.py      per-row sampling settings, stop strings, streamable text
    batcher.py       request queue + continuous batching in one model worker thread (Batcher)
    app.py           the FastAPI app (create_app) and run_server
    metrics.py       Prometheus text metrics
    testing.py       a tiny character tokenizer and a server-in-a-thread for tests
    testing_pg.py    a throwaway PostgreSQL cluster and server-replica processes for tests

Library entry points for the CLI: `PrefixStore`, `create_app`, `run_server`, `ServeConfig`.
Importing this package imports neither torch nor FastAPI; the names above load them on first use.
"""

import importlib

from .config import ServeConfig

# Everything else on first use: the store reads prefix files (torch), the app needs FastAPI, and the CLI's
# `--help` reads ServeConfig from here without paying for either (start-up time).
_LAZY = {"PrefixStore": "store", "PrefixRecord": "store", "KeyRecord": "store", "create_app": "app",
         "run_server": "app"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ServeConfig", "PrefixStore", "PrefixRecord", "KeyRecord", "create_app", "run_server"]
