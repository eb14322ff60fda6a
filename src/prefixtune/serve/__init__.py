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
Importing this package does not import FastAPI; `create_app`/`run_server` load it on first use.
"""

from .config import ServeConfig
from .store import KeyRecord, PrefixRecord, PrefixStore



def __getattr__(name: str):
    if name in ("create_app", "run_server"):  # lazily: FastAPI is only needed to serve
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ServeConfig", "PrefixStore", "PrefixRecord", "KeyRecord", "create_app", "run_server"]
