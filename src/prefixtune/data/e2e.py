"""E2E NLG Challenge, restaurant domain (Novikova et al., 2017).

Two file formats are read:

* **src1** (the files Li & Liang's prefix-tuning code trains on, e.g. ``src1_valid.txt``):
  one ``MR||reference`` pair a line, the MR already linearized as
  ``name : Alimentum | area : city centre | family friendly : no``, references tokenized.
* **official CSV** (github.com/tuetschek/e2e-dataset: ``trainset.csv``, ``devset.csv``,
  ``testset_w_refs.csv``): a header with columns ``mr`` and ``ref``, MRs written as
  ``name[The Eagle], eatType[coffee shop], priceRange[£20-25], ...``.

Both are normalized to the src1 linearization, so the same MR gives the same source
string whichever file it came from::

    name : The Eagle | Type : coffee shop | price : £ 20 - 25 | family friendly : yes

Fields keep the order the file gives them in (the official files use one canonical
order, which the src1 files keep), separated by `` | ``. CSV field names are renamed to
the src1 ones (``eatType`` -> ``Type``, ``priceRange`` -> ``price``, ``familyFriendly``
-> ``family friendly``) and CSV values get the src1 files' tokenization of currency signs
and ranges (``less than £20`` -> ``less than £ 20``, ``£20-25`` -> ``£ 20 - 25``).
References are kept as written: tokenized in src1 files, raw in the CSV files.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from .base import DataError, Dataset, Example, locate, read_text
from .fetch import Resource

NAME = "e2e"
HOMEPAGE = "https://github.com/tuetschek/e2e-dataset"
LICENSE = "CC BY-SA 4.0"

# split -> candidate files under the data folder, src1 first (what the paper's code used).
SPLIT_FILES = {
    "train": ("e2e/src1_train.txt", "e2e/trainset.csv"),
    "dev": ("e2e/src1_valid.txt", "e2e/devset.csv"),
    "test": ("e2e/src1_test.txt", "e2e/testset_w_refs.csv"),
}

_RAW = "https://raw.githubusercontent.com/tuetschek/e2e-dataset/master/"
RESOURCES = (
    Resource("e2e/trainset.csv", (_RAW + "trainset.csv",), splits=("train",)),
    Resource("e2e/devset.csv", (_RAW + "devset.csv",), splits=("dev",)),
    Resource("e2e/testset_w_refs.csv", (_RAW + "testset_w_refs.csv",), splits=("test",)),
)

# Official CSV field names -> the names used in the src1 files.
FIELD_NAMES = {
    "name": "name",
    "eatType": "Type",
    "food": "food",
    "priceRange": "price",
    "customer rating": "customer rating",
    "area": "area",
    "familyFriendly": "family friendly",
    "near": "near",
}


def load(root: Path, split: str, *, file_format: str | None = None) -> Dataset:
    """Load an E2E split from ``root``.

    ``file_format``: ``"src1"`` or ``"csv"`` to require one file format; ``None`` takes the
    first file found, src1 before CSV.
    """
    candidates = SPLIT_FILES[split]
    if file_format is not None:
        if file_format not in ("src1", "csv"):
            raise ValueError(f"E2E file_format must be 'src1', 'csv' or None, not {file_format!r}")
        candidates = tuple(c for c in candidates if c.endswith(".csv") == (file_format == "csv"))
    path = locate(root, candidates, dataset=NAME, split=split)
    if path.suffix == ".csv":
        examples, fmt = read_csv(path), "csv"
    else:
        examples, fmt = read_src1(path), "src1"
    if not examples:
        raise DataError("holds no MR/reference pairs (empty file?)", path)
    return Dataset(NAME, split, examples, info={"files": [str(path)], "format": fmt})


# ---------------------------------------------------------------- src1 format


def read_src1(path: str | Path) -> list[Example]:
    """Read a ``MR||reference`` file; blank lines are skipped."""
    examples = []
    # decoded whole, so a non-UTF-8 byte is reported with its line
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        parts = line.split("||")
        if len(parts) != 2:
            raise DataError(
                f"expected one 'MR||reference' pair, found {len(parts) - 1} '||' separators",
                path,
                line=lineno,
            )
        mr, ref = parts
        ref = ref.strip()
        if not ref:
            raise DataError("empty reference", path, line=lineno)
        try:
            source = normalize_src1_mr(mr)
        except ValueError as e:
            raise DataError(str(e), path, line=lineno) from None
        examples.append(Example(source, ref))
    return examples


def normalize_src1_mr(mr: str) -> str:
    """``name : X|  area : Y `` -> ``name : X | area : Y`` (whitespace normalized)."""
    fields = []
    for part in mr.split("|"):
        key, sep, value = part.partition(":")
        key, value = _squash(key), _squash(value)
        if not sep or not key or not value:
            raise ValueError(f"MR field {part.strip()!r} is not 'field : value'")
        fields.append((key, value))
    return linearize(fields)


# ---------------------------------------------------------------- official CSV format

_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*")


def read_csv(path: str | Path) -> list[Example]:
    """Read an official E2E CSV file (columns ``mr`` and ``ref``, any others ignored)."""
    examples = []
    with io.StringIO(read_text(path, "utf-8-sig"), newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError("empty file, expected a header with columns 'mr' and 'ref'", path, line=1)
            columns = [h.strip().lower() for h in header]
            if "mr" not in columns or "ref" not in columns:
                raise DataError(f"header {header} lacks the columns 'mr' and 'ref'", path, line=1)
            i_mr, i_ref = columns.index("mr"), columns.index("ref")
            for row in reader:
                lineno = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise DataError(f"expected {len(header)} columns, found {len(row)}", path, line=lineno)
                ref = row[i_ref].strip()
                if not ref:
                    raise DataError("empty reference", path, line=lineno)
                try:
                    source = linearize(parse_csv_mr(row[i_mr]))
                except ValueError as e:
                    raise DataError(str(e), path, line=lineno) from None
                examples.append(Example(source, ref))
        except csv.Error as e:
            raise DataError(f"malformed CSV: {e}", path, line=reader.line_num) from None
    return examples


def parse_csv_mr(mr: str) -> list[tuple[str, str]]:
    """``name[The Eagle], eatType[coffee shop]`` -> ``[("name", "The Eagle"), ("Type", "coffee shop")]``.

    Field names are mapped to the src1 names, values tokenized like the src1 files.
    """
    fields, pos = [], 0
    while True:
        m = _SLOT.match(mr, pos)
        if m is None:
            raise ValueError(f"cannot parse MR {mr!r} at {mr[pos:pos + 30]!r}: expected 'field[value]'")
        key, value = m.group(1).strip(), _tokenize_value(m.group(2))
        if not value:
            raise ValueError(f"MR {mr!r}: empty value for field {key!r}")
        fields.append((FIELD_NAMES.get(key, key), value))
        pos = m.end()
        if pos == len(mr):
            return fields
        if mr[pos] != ",":
            raise ValueError(f"cannot parse MR {mr!r} at {mr[pos:pos + 30]!r}: expected ','")
        pos += 1


def _tokenize_value(value: str) -> str:
    # What the src1 files did to the (few) E2E values with symbols: "£20-25" -> "£ 20 - 25".
    value = re.sub(r"([£$€])", r" \1 ", value)
    value = re.sub(r"(?<=\S)-(?=\S)", " - ", value)
    return _squash(value)


# ---------------------------------------------------------------- linearization


def linearize(fields: list[tuple[str, str]]) -> str:
    """``[("name", "X"), ("Type", "pub")]`` -> ``name : X | Type : pub``."""
    return " | ".join(f"{key} : {value}" for key, value in fields)


def _squash(text: str) -> str:
    return " ".join(text.split())
