"""The dataset registry, the data folder, and the two entry points.

``load_dataset(name, split, data_dir)`` reads a split from the data folder;
``download(name, data_dir)`` fetches the official files into it.

The data folder is, in order: the ``data_dir`` argument, the ``PREFIXTUNE_DATA``
environment variable, or ``$XDG_CACHE_HOME/prefixtune/data`` (``~/.cache/prefixtune/data``).
Under it each dataset has its own folder, laid out as in the project's shared data::

    e2e/src1_valid.txt  e2e/devset.csv ...       webnlg2017/{train,dev}/Ntriples/*.xml
    dart/dart-v1.1.1-full-dev.json ...           xsum/xsum_validation_1000.jsonl, xsum/full/
    boolq/boolq_dev.jsonl
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from . import boolq, cifar10, dart, e2e, jsonl, webnlg, xsum
from .base import Dataset, MissingDataError
from .fetch import DownloadError, Fetcher, Resource, place_all, urllib_fetch

ENV_VAR = "PREFIXTUNE_DATA"
SPLIT_ALIASES = {"valid": "dev", "validation": "dev", "val": "dev"}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    loader: Callable[..., Dataset]  # loader(data_folder, split, **options) -> Dataset
    splits: tuple[str, ...]  # empty: any split name (it only labels the result)
    default_split: str
    resources: tuple[Resource, ...]  # official files for download(); empty: none
    homepage: str
    license: str
    description: str

    def options(self) -> dict:
        """The loader's keyword options and their defaults."""
        return {
            p.name: p.default
            for p in inspect.signature(self.loader).parameters.values()
            if p.kind is p.KEYWORD_ONLY
        }

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(url for r in self.resources for url in r.urls)


DATASETS: dict[str, DatasetSpec] = {
    "e2e": DatasetSpec(
        "e2e", e2e.load, ("train", "dev", "test"), "train", e2e.RESOURCES, e2e.HOMEPAGE, e2e.LICENSE,
        "E2E NLG Challenge: restaurant MR -> text (src1 'MR||ref' or official CSV files)",
    ),
    "webnlg": DatasetSpec(
        "webnlg", webnlg.load, ("train", "dev", "test"), "train", webnlg.RESOURCES, webnlg.HOMEPAGE,
        webnlg.LICENSE, "WebNLG Challenge 2017: DBpedia triple sets -> text (XML)",
    ),
    "dart": DatasetSpec(
        "dart", dart.load, ("train", "dev", "test"), "train", dart.RESOURCES, dart.HOMEPAGE, dart.LICENSE,
        "DART v1.1.1: open-domain triple sets -> text (JSON)",
    ),
    "xsum": DatasetSpec(
        "xsum", xsum.load, ("train", "dev", "test", "all"), "train", xsum.RESOURCES, xsum.HOMEPAGE,
        xsum.LICENSE, "XSum: BBC article -> one-sentence summary (JSONL; 1k sample or full)",
    ),
    "boolq": DatasetSpec(
        "boolq", boolq.load, ("train", "dev", "test", "all"), "train", boolq.RESOURCES, boolq.HOMEPAGE,
        boolq.LICENSE, "BoolQ: yes/no question + Wikipedia passage -> True/False (official dev, carved 80/10/10)",
    ),
    "cifar10": DatasetSpec(
        "cifar10", cifar10.load, ("train", "dev", "test", "all"), "train", (), cifar10.HOMEPAGE, cifar10.LICENSE,
        "CIFAR-10 images -> class (VTAB-1k: seeded 800 train + 200 dev from the training file; test file; .npz)",
    ),
    "jsonl": DatasetSpec(
        "jsonl", jsonl.load, (), "train", (), "", "",
        "your own data: JSONL lines {'source': ..., 'target': str or [str, ...]}; needs path=",
    ),
}
ALIASES = {"webnlg2017": "webnlg", "webnlg17": "webnlg", "e2e_nlg": "e2e"}


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data folder: ``data_dir``, else $PREFIXTUNE_DATA, else the user cache folder."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "prefixtune" / "data"


def get_spec(name: str) -> DatasetSpec:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)} (or a path to a .jsonl file)")
    return DATASETS[key]


def load_dataset(
    name: str | Path,
    split: str = "train",
    data_dir: str | Path | None = None,
    *,
    download: bool = False,
    fetch: Fetcher | None = None,
    **opts,
) -> Dataset:
    """Load split ``split`` of dataset ``name`` from the data folder.

    ``name`` is a registry name (see ``DATASETS``) or a path ending in ``.jsonl``.
    ``split`` accepts ``valid``/``validation`` for ``dev``. ``opts`` are the dataset's
    options (``DATASETS[name].options()``). A missing file raises FileNotFoundError
    naming the paths looked for, unless ``download=True``: then the official files
    are fetched (with ``fetch``, default urllib) into the data folder first.
    """
    if isinstance(name, Path) or str(name).lower().endswith(".jsonl"):
        return jsonl.load(None, split, path=name, **opts)
    spec = get_spec(name)
    split = SPLIT_ALIASES.get(split, split)
    if spec.splits and split not in spec.splits:
        raise ValueError(f"{spec.name} has splits {list(spec.splits)}, not {split!r}")
    root = resolve_data_dir(data_dir)
    try:
        return spec.loader(root, split, **opts)
    except MissingDataError as e:
        if not (download and e.downloadable and spec.resources):
            raise
        missing = e.what
    try:
        _download(spec, root, splits=[split], fetch=fetch, force=False)
    except DownloadError as e:  # say first that the folder lacks it: a mistyped --data-dir is the likelier cause
        raise DownloadError(f"{missing}; and {e}") from e
    return spec.loader(root, split, **opts)


def download(
    name: str,
    data_dir: str | Path | None = None,
    *,
    splits: Iterable[str] | None = None,
    fetch: Fetcher | None = None,
    force: bool = False,
) -> Path:
    """Fetch the official files of ``name`` into the data folder; returns the folder.

    ``splits`` limits it to those splits (default: all). Files already there are kept
    unless ``force``. Each file (or folder) appears only once complete: it is fetched
    and built in a temporary folder beside it, then renamed into place.
    """
    spec = get_spec(name)
    if not spec.resources:
        raise ValueError(f"{spec.name} has no official download")
    root = resolve_data_dir(data_dir)
    _download(spec, root, splits=splits, fetch=fetch, force=force)
    return root


def _download(
    spec: DatasetSpec, root: Path, *, splits: Iterable[str] | None, fetch: Fetcher | None, force: bool
) -> None:
    wanted = None if splits is None else {SPLIT_ALIASES.get(s, s) for s in splits}
    chosen = [r for r in spec.resources if wanted is None or not r.splits or wanted & set(r.splits)]
    place_all(chosen, root, fetch or urllib_fetch, force=force)
