"""Core data types shared by every dataset loader.

A dataset is a flat list of (source, target) training pairs. Table-to-text data has
several references per input, so the same ``source`` string appears on several
consecutive pairs; :meth:`Dataset.eval_items` groups them back into one item per
distinct source with all of its references, which is what evaluation needs.

Nothing here knows about models or tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence


class DataError(ValueError):
    """A data file is malformed.

    The message always names the file, and where in it the problem is: the line
    number for text formats (``path:LINE: ...``), the entry index (and WebNLG ``eid``)
    for XML/JSON formats (``path: entry N (eid IdK): ...``).
    """

    def __init__(
        self,
        message: str,
        path: str | Path | None = None,
        *,
        line: int | None = None,
        entry: int | None = None,
        eid: str | None = None,
    ) -> None:
        self.path = None if path is None else Path(path)
        self.line = line
        self.entry = entry
        self.eid = eid
        where = "" if path is None else str(path)
        if line is not None:
            where += f":{line}"
        if entry is not None:
            where += f": entry {entry}"
            if eid is not None:
                where += f" (eid {eid})"
        super().__init__(f"{where}: {message}" if where else message)


@dataclass(frozen=True)
class Example:
    """One training pair."""

    source: str  # linearized input text
    target: str  # one reference text


@dataclass(frozen=True)
class EvalItem:
    """One distinct source with all of its references, for evaluation.

    Equality and hashing use ``source`` and ``references`` only, not ``meta``.
    """

    source: str
    references: tuple[str, ...]
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Dataset:
    """A named split: one :class:`Example` per (source, reference) pair.

    ``meta`` maps a source string to metadata about it (e.g. WebNLG category and
    whether the category is "seen"); sources without metadata have none.
    ``info`` records provenance: the files read, the options used, skipped rows.
    """

    name: str
    split: str
    examples: list[Example]
    meta: dict[str, dict] = field(default_factory=dict, repr=False)
    info: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    def sources(self) -> list[str]:
        """Distinct sources in first-appearance order."""
        return list(dict.fromkeys(ex.source for ex in self.examples))

    def eval_items(self) -> list[EvalItem]:
        """One item per distinct source, in first-appearance order, with all references."""
        refs: dict[str, list[str]] = {}
        for ex in self.examples:
            refs.setdefault(ex.source, []).append(ex.target)
        return [
            EvalItem(source, tuple(targets), dict(self.meta.get(source, {})))
            for source, targets in refs.items()
        ]

    def restrict(self, sources: set[str] | frozenset[str], *, split: str | None = None) -> "Dataset":
        """A copy keeping only the pairs whose source is in ``sources`` (order kept)."""
        examples = [ex for ex in self.examples if ex.source in sources]
        return Dataset(
            name=self.name,
            split=self.split if split is None else split,
            examples=examples,
            meta={s: m for s, m in self.meta.items() if s in sources},
            info=dict(self.info),
        )


def read_text(path: str | Path, encoding: str = "utf-8") -> str:
    """A data file's text; bytes that are not `encoding` are a DataError naming the file and line."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"not {encoding.upper().replace('-SIG', '')} text (byte {raw[e.start:e.start + 1]!r} at offset "
                        f"{e.start}); save the file as UTF-8", path, line=line) from None


class MissingDataError(FileNotFoundError):
    """A data file is not in the data folder.

    ``downloadable`` says whether :func:`prefixtune.data.download` can fetch it.
    """

    def __init__(self, message: str, *, downloadable: bool = True, what: str | None = None) -> None:
        super().__init__(message)
        self.downloadable = downloadable
        self.what = what or message  # what is missing and where it was looked for, without the advice


def locate(
    root: Path,
    candidates: Sequence[str],
    *,
    dataset: str,
    split: str,
    downloadable: bool = True,
    how: str = "",
) -> Path:
    """Return the first of ``root / c`` that exists, else raise :class:`MissingDataError`.

    The error names every path looked for and says how to get the data: with
    ``download(dataset)`` when ``downloadable``, and ``how`` (extra advice) if given.
    """
    paths = [root / c for c in candidates]
    for path in paths:
        if path.exists():
            return path
    advice = [how] if how else []
    if downloadable:
        advice.append(
            f"Download it from its official source with prefixtune.data.download('{dataset}', data_dir) "
            f"(or load_dataset(..., download=True); the prefixtune CLI does this for you)."
        )
    advice.append(
        f"Or point --data-dir / the PREFIXTUNE_DATA environment variable at a folder that holds it "
        f"(data folder used: {root})."
    )
    looked = ", ".join(str(p) for p in paths)
    what = f"{dataset} split '{split}' not found; looked for: {looked}"
    raise MissingDataError(f"{what}. " + " ".join(advice), downloadable=downloadable, what=what)
