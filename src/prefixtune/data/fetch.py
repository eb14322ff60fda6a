"""Downloading official data files into the data folder, atomically.

A :class:`Resource` is one thing placed under the data folder (a file or a folder),
made from one or more fetched URLs. Placing it never leaves a partial result:
everything is fetched and built inside a temporary folder next to the target, and
only a complete result is renamed into place (``os.replace``, same file system). If a
fetch or a build step raises, the temporary folder is removed and the target is left
as it was.

The network access itself is a *fetcher*: ``fetch(url, dest)`` writes the resource at
``url`` to the file ``dest``. :func:`urllib_fetch` is the default; tests inject a fake.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger(__name__)

Fetcher = Callable[[str, Path], None]
# build(fetched_files, out): make the target at path ``out`` (a file or a folder) from
# the fetched files, in the order of Resource.urls.
Builder = Callable[[list[Path], Path], None]

USER_AGENT = "prefixtune-data"


@dataclass(frozen=True)
class Resource:
    """One file or folder under the data folder, and how to get it."""

    target: str  # path relative to the data folder (file, or folder when ``build`` makes one)
    urls: tuple[str, ...]  # official sources to fetch
    splits: tuple[str, ...] = ()  # dataset splits it provides (empty: all)
    build: Builder | None = None  # None: the single fetched file is the target as is


def urllib_fetch(url: str, dest: Path, *, timeout: float = 60.0) -> None:
    """Stream ``url`` to ``dest`` with the standard library (follows redirects)."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except OSError as e:  # URLError, HTTPError, timeouts: say what could not be fetched and what to do
        raise DownloadError(f"could not download {url} ({getattr(e, 'reason', e)}); without internet, put the "
                            "official files in the data folder yourself and pass --data-dir or set PREFIXTUNE_DATA") from e


class DownloadError(OSError):
    """A data file could not be fetched; the message names the URL and the way around it."""


def place(resource: Resource, root: Path, fetch: Fetcher, *, force: bool = False) -> Path:
    """Fetch and build ``resource`` under ``root`` unless it is already there.

    Returns the target path. Atomic: on any error nothing new is left under ``root``
    (the temporary folder is removed) and an existing target is untouched.
    """
    target = root / resource.target
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.part-") as tmp:
        tmpdir = Path(tmp)
        fetched = []
        for i, url in enumerate(resource.urls):
            dest = tmpdir / f"fetched-{i}-{_basename(url)}"
            log.info("downloading %s", url)
            fetch(url, dest)
            if not dest.is_file():
                raise OSError(f"fetching {url} produced no file")
            fetched.append(dest)
        if resource.build is None:
            if len(fetched) != 1:
                raise ValueError(f"{resource.target}: several URLs need a build step")
            built = fetched[0]
        else:
            built = tmpdir / "built"
            resource.build(fetched, built)
            if not built.exists():
                raise OSError(f"building {resource.target} produced nothing")
        _replace(built, target, tmpdir)
    return target


def _replace(built: Path, target: Path, tmpdir: Path) -> None:
    """Move ``built`` to ``target`` atomically; an old folder goes to ``tmpdir`` (then removed)."""
    if target.is_dir() and not target.is_symlink():
        # os.replace cannot overwrite a non-empty folder: move the old one aside first.
        os.replace(target, tmpdir / "old")
        try:
            os.replace(built, target)
        except BaseException:
            os.replace(tmpdir / "old", target)
            raise
    else:
        os.replace(built, target)


def place_all(resources: Sequence[Resource], root: Path, fetch: Fetcher, *, force: bool = False) -> list[Path]:
    return [place(r, root, fetch, force=force) for r in resources]


def _basename(url: str) -> str:
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:80] or "file"
