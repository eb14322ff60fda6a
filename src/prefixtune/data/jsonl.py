"""Generic JSONL, for users' own tasks.

One JSON object a line::

    {"source": "table or document text", "target": "one reference"}
    {"source": "...", "target": ["reference 1", "reference 2"]}

A list target gives one training pair per reference. Lines with the same source are
grouped by :meth:`Dataset.eval_items`. Other keys of a line (e.g. ``"id"``) become that
source's metadata (first line wins). Sources are kept verbatim, references are
stripped of surrounding whitespace. Blank lines are skipped.

Use ``load_dataset("jsonl", path="file.jsonl")`` or ``load_dataset("file.jsonl")``;
a relative path is taken from the current folder, not the data folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .base import DataError, Dataset, Example, read_text

NAME = "jsonl"


def load(root: Path | None, split: str, *, path: str | Path | None = None) -> Dataset:
    """Load the JSONL file at ``path``; ``split`` only names the result."""
    if path is None:
        raise DataError("the jsonl dataset needs the file: give --path FILE.jsonl (path=...)")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"JSONL data file not found: {path}")
    examples, meta = read_jsonl(path)
    if not examples:
        raise DataError("holds no examples (empty file?)", path)
    return Dataset(NAME, split, examples, meta=meta, info={"files": [str(path)]})


def json_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is a DataError."""
    # decoded whole, so a non-UTF-8 byte is reported with its line
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg}", path, line=lineno) from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, found {type(obj).__name__}", path, line=lineno)
        yield lineno, obj


def read_jsonl(path: str | Path) -> tuple[list[Example], dict[str, dict]]:
    examples: list[Example] = []
    meta: dict[str, dict] = {}
    for lineno, obj in json_objects(path):
        source, target = obj.get("source"), obj.get("target")
        if not isinstance(source, str) or not source.strip():
            raise DataError("missing or empty 'source' string", path, line=lineno)
        targets = [target] if isinstance(target, str) else target
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise DataError("'target' must be a string or a non-empty list of strings", path, line=lineno)
        if not all(t.strip() for t in targets):
            raise DataError("empty reference in 'target'", path, line=lineno)
        examples.extend(Example(source, t.strip()) for t in targets)
        extra = {k: v for k, v in obj.items() if k not in ("source", "target")}
        if extra:
            meta.setdefault(source, extra)
    return examples, meta
