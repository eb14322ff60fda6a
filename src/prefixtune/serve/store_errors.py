"""The prefix store's errors, in their own module: the store facade (store.py) and its SQLite and
PostgreSQL backends (store_sql.py, store_pg.py) all raise them, so none of them imports another's
module for its errors (that import ran back up from the backends to the facade: a circle)."""

from __future__ import annotations


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
