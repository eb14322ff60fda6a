"""BoolQ (Clark et al., 2019): a yes/no question about a Wikipedia passage -> "True" / "False".

JSONL, one ``{"question", "title", "passage", "answer"}`` object a line; ``answer`` is a JSON
boolean in the official files and the string ``"True"``/``"False"`` in the project's shared copy;
both are read. Each line becomes ``Example(source="QUESTION [SEP] PASSAGE", target="True"|"False")``:
classification methods (``ptuning-v2``) split the source at ``PAIR_SEPARATOR`` and encode the two
parts as a sentence pair. The title is kept as the source's metadata.

Only the official **dev** split (3,270 pairs, ``boolq/boolq_dev.jsonl``) is used; the official test
split has no labels. It is carved, by a seeded shuffle of its lines (``split_seed``, default 0), into
fixed parts: ``train`` 80 % (2,616), ``dev`` 10 % (327), ``test`` 10 % (327); ``all`` is the whole
file. Each part keeps the file's order. ``download('boolq')`` fetches the official dev file.
"""

from __future__ import annotations

from pathlib import Path

from .base import DataError, Dataset, Example, locate
from .fetch import Resource
from .jsonl import json_objects
from .xsum import carve

NAME = "boolq"
HOMEPAGE = "https://github.com/google-research-datasets/boolean-questions"
LICENSE = "CC BY-SA 3.0"
DEV_FILE = "boolq/boolq_dev.jsonl"
# The authors' release (same fields; answers are JSON booleans).
DEV_URL = "https://storage.googleapis.com/boolq/dev.jsonl"
RESOURCES = (Resource(DEV_FILE, (DEV_URL,)),)

# Between question and passage in Example.source; classification methods encode "A [SEP] B" as a pair.
PAIR_SEPARATOR = " [SEP] "
LABELS = ("False", "True")


def load(root: Path, split: str, *, split_seed: int = 0) -> Dataset:
    """Load a BoolQ part (``train``/``dev``/``test`` carved from the official dev file, or ``all``)."""
    path = locate(root, (DEV_FILE,), dataset=NAME, split=split)
    rows = read_jsonl(path)
    if split != "all":
        rows = [rows[i] for i in carve(len(rows), split_seed)[split]]
    examples = [Example(q + PAIR_SEPARATOR + p, answer) for q, _, p, answer in rows]
    meta = {q + PAIR_SEPARATOR + p: {"title": title} for q, title, p, _ in rows}
    return Dataset(NAME, split, examples, meta=meta, info={"files": [str(path)], "split_seed": split_seed})


def read_jsonl(path: str | Path) -> list[tuple[str, str, str, str]]:
    """(question, title, passage, "True"|"False") rows. Errors name the file and line."""
    rows = []
    for lineno, obj in json_objects(path):
        question, passage, answer = obj.get("question"), obj.get("passage"), obj.get("answer")
        for key, value in (("question", question), ("passage", passage)):
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"missing or empty string field {key!r}", path, line=lineno)
        if isinstance(answer, bool):
            answer = str(answer)
        if answer not in LABELS:
            raise DataError(f"'answer' must be true/false or \"True\"/\"False\", got {obj.get('answer')!r}",
                            path, line=lineno)
        if PAIR_SEPARATOR.strip() in question:
            raise DataError(f"question contains the pair separator {PAIR_SEPARATOR.strip()!r}", path, line=lineno)
        rows.append((" ".join(question.split()), str(obj.get("title", "")), " ".join(passage.split()), answer))
    return rows
