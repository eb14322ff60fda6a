"""DART v1.1.1 (Nan et al., 2021): open-domain triple sets -> text.

A JSON file holding a list of ``{"tripleset": [[s, p, o], ...], "annotations":
[{"source": ..., "text": ...}, ...]}``; every annotation text is a reference.

Sources use the WebNLG triple linearization (:func:`webnlg.linearize_triples`) with the
two differences Li & Liang's code has for DART: properties are lowercased and there
is no leading separator::

    Mars Hill College : joined : 1973 | Mars Hill College : location : Mars Hill, North Carolina

Both are options (``lowercase_properties``, ``leading_separator``) to get the exact
WebNLG form instead. Several triple sets can linearize to the same source (the dev file
has 2,768 triple sets and 2,721 distinct sources); their references are pooled in
:meth:`Dataset.eval_items`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import DataError, Dataset, Example, locate, read_text
from .fetch import Resource
from .webnlg import linearize_triples

NAME = "dart"
HOMEPAGE = "https://github.com/Yale-LILY/dart"
LICENSE = "MIT"

SPLIT_FILES = {split: (f"dart/dart-v1.1.1-full-{split}.json",) for split in ("train", "dev", "test")}

_RAW = "https://raw.githubusercontent.com/Yale-LILY/dart/master/data/v1.1.1/"
RESOURCES = tuple(
    Resource(f"dart/dart-v1.1.1-full-{split}.json", (f"{_RAW}dart-v1.1.1-full-{split}.json",), splits=(split,))
    for split in ("train", "dev", "test")
)


def load(
    root: Path,
    split: str,
    *,
    lowercase_properties: bool = True,
    leading_separator: bool = False,
    underscores_to_spaces: bool = False,
) -> Dataset:
    """Load a DART split from ``root``."""
    path = locate(root, SPLIT_FILES[split], dataset=NAME, split=split)
    examples: list[Example] = []
    meta: dict[str, dict] = {}
    records = read_json(path)
    for triples, texts in records:
        source = linearize_triples(
            triples,
            leading_separator=leading_separator,
            lowercase_properties=lowercase_properties,
            underscores_to_spaces=underscores_to_spaces,
        )
        meta.setdefault(source, {"size": len(triples)})
        examples.extend(Example(source, text) for _, text in texts)
    return Dataset(NAME, split, examples, meta=meta, info={"files": [str(path)], "entries": len(records)})


def read_json(path: str | Path) -> list[tuple[list[tuple[str, str, str]], list[tuple[str, str]]]]:
    """Parse a DART JSON file into (triples, [(annotation source, text), ...]) per entry.

    Errors name the file and the entry (0-based index in the list).
    """
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON: {e.msg}", path, line=e.lineno) from None
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of entries, found {type(data).__name__}", path)
    records = []
    for index, entry in enumerate(data):
        def fail(message: str) -> DataError:
            return DataError(message, path, entry=index)

        if not isinstance(entry, dict):
            raise fail(f"expected an object, found {type(entry).__name__}")
        tripleset, annotations = entry.get("tripleset"), entry.get("annotations")
        if not isinstance(tripleset, list) or not tripleset:
            raise fail("missing or empty 'tripleset' list")
        if not isinstance(annotations, list) or not annotations:
            raise fail("missing or empty 'annotations' list")
        triples = []
        for t in tripleset:
            if not (isinstance(t, list) and len(t) == 3 and all(isinstance(x, str) for x in t)):
                raise fail(f"triple {t!r} is not [subject, property, object] strings")
            triples.append(tuple(x.strip() for x in t))
        refs = []
        for a in annotations:
            text = a.get("text") if isinstance(a, dict) else None
            if not isinstance(text, str):
                raise fail(f"annotation {a!r} has no 'text' string")
            if not text.strip():
                raise fail("empty reference (annotation text)")
            refs.append((a.get("source", ""), text.strip()))
        records.append((triples, refs))
    return records
