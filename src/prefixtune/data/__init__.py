"""Table-to-text and summarization datasets (Li & Liang 2021, §5.1), model-agnostic.

    from prefixtune.data import load_dataset, low_data_split

    ds = load_dataset("webnlg", "train", data_dir="../shared/data")
    ds.examples[0]      # Example(source=' | Aarhus_Airport : cityServed : ...', target='...')
    ds.eval_items()     # one EvalItem per distinct source, with all its references

    train, held_out = low_data_split(load_dataset("e2e", "dev"), n=100, seed=0)

Datasets (``DATASETS``): ``e2e``, ``webnlg``, ``dart``, ``xsum``, ``jsonl`` (your own
``{"source", "target"}`` lines). One module per dataset documents its file format and
linearization; ``registry`` documents the data folder and downloads.
"""

from .base import DataError, Dataset, EvalItem, Example, MissingDataError
from .fetch import Fetcher, Resource, urllib_fetch
from .lowdata import low_data_split
from .registry import (
    ALIASES,
    DATASETS,
    ENV_VAR,
    DatasetSpec,
    download,
    get_spec,
    load_dataset,
    resolve_data_dir,
)
from .webnlg import SEEN_CATEGORIES, UNSEEN_CATEGORIES, linearize_triples

__all__ = [
    "ALIASES",
    "DATASETS",
    "ENV_VAR",
    "SEEN_CATEGORIES",
    "UNSEEN_CATEGORIES",
    "DataError",
    "Dataset",
    "DatasetSpec",
    "EvalItem",
    "Example",
    "Fetcher",
    "MissingDataError",
    "Resource",
    "download",
    "get_spec",
    "linearize_triples",
    "load_dataset",
    "low_data_split",
    "resolve_data_dir",
    "urllib_fetch",
]
